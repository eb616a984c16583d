use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Set by build.rs from `git rev-parse`; `unknown` outside a checkout.
pub const BUILD_COMMIT: &str = env!("MEMBERSYNC_GIT_COMMIT");

/// The process-wide Prometheus registry. Each role registers its own metric families on it
/// (cheap to clone: a registry is a handle).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "membersync_build_info",
                "Build of the running membersync (always 1).",
            ),
            &["version", "commit"],
        )
        .expect("static metric definition");
        build_info
            .with_label_values(&[BUILD_VERSION, BUILD_COMMIT])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("fresh registry");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("fresh registry");
        Self { registry }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every registered family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_build_info_and_process_metrics() {
        let text = Metrics::new().render();
        assert!(text.contains("membersync_build_info{commit=\""), "{text}");
        assert!(
            text.contains(&format!("version=\"{BUILD_VERSION}\"}} 1")),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
