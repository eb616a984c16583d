//! Registering a client's metric families without ever panicking.

use prometheus::Registry;
use prometheus::core::Collector;

/// Registers `collectors` in `registry`, all or none. The metrics work either way (they are
/// shared handles); they are only exported when registration succeeded.
///
/// A second client built against the same registry (tests do this; the daemon builds one
/// client and clones it) gets `AlreadyReg`: its metrics then stay unregistered rather than
/// panicking or double-counting, and the first client's families keep being exported.
pub(crate) fn register_all(
    registry: Option<&Registry>,
    what: &str,
    collectors: Vec<Box<dyn Collector>>,
) {
    let Some(registry) = registry else { return };
    let mut done: Vec<Box<dyn Collector>> = Vec::new();
    for collector in collectors {
        let clone = boxed_clone(&*collector);
        match registry.register(collector) {
            Ok(()) => done.push(clone),
            Err(err) => {
                for c in done {
                    let _ = registry.unregister(c);
                }
                match err {
                    prometheus::Error::AlreadyReg => tracing::debug!(
                        client = what,
                        "metrics already registered by another client; this one's are not exported"
                    ),
                    other => {
                        tracing::warn!(client = what, error = %other, "could not register metrics")
                    }
                }
                return;
            }
        }
    }
}

/// `unregister` matches by descriptor, so a collector that only reports the same descriptors
/// is enough to undo a registration.
fn boxed_clone(collector: &dyn Collector) -> Box<dyn Collector> {
    Box::new(Descs(collector.desc().into_iter().cloned().collect()))
}

struct Descs(Vec<prometheus::core::Desc>);

impl Collector for Descs {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        Vec::new()
    }
}
