//! Which Make.com webhook URLs an outcome goes to (`[bridge.routes]`): every matching route
//! gets it; fallback routes get what no other route matched.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::BridgeConfig;

/// The fields of an outcome record (`schemas/kafka/sync.json`) the bridge routes and labels
/// by. The record itself is forwarded as it is.
#[derive(Debug, Clone, Deserialize)]
pub struct OutcomeHead {
    pub id: String,
    pub event_id: String,
    #[serde(default)]
    pub member_id: Option<String>,
    pub source: String,
    pub event_type: String,
    pub status: String,
}

/// One webhook URL of one route. `Debug` and `host` never show the URL's path: it is the
/// hook's token.
pub struct Target {
    pub route: String,
    /// Position of the URL within its route (dead-letter ids tell URLs of one host apart).
    pub index: usize,
    pub url: reqwest::Url,
    /// `host[:port]`, what logs, metrics and dead letters show.
    pub host: String,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("route", &self.route)
            .field("index", &self.index)
            .field("host", &self.host)
            .finish()
    }
}

/// `host[:port]` of a URL (the part that may be logged).
pub fn host_of(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

struct Route {
    statuses: Vec<String>,
    event_types: Vec<String>,
    sources: Vec<String>,
    fallback: bool,
    targets: Vec<Arc<Target>>,
}

impl Route {
    fn matches(&self, o: &OutcomeHead) -> bool {
        let any_or = |list: &[String], f: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|x| f(x))
        };
        any_or(&self.statuses, &|s| s == o.status)
            && any_or(&self.sources, &|s| s == o.source)
            && any_or(&self.event_types, &|p| event_type_matches(p, &o.event_type))
    }
}

/// `member.plan.*` matches `member.plan.updated`; `*` matches everything; otherwise exact.
pub fn event_type_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(cfg: &BridgeConfig) -> Self {
        let routes = cfg
            .routes
            .iter()
            .map(|(name, r)| Route {
                statuses: r
                    .statuses
                    .iter()
                    .map(|s| {
                        serde_json::to_value(s)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    })
                    .collect(),
                event_types: r.event_types.clone(),
                sources: r.sources.clone(),
                fallback: r.fallback,
                targets: r
                    .urls()
                    .into_iter()
                    .enumerate()
                    .map(|(index, url)| {
                        Arc::new(Target {
                            route: name.clone(),
                            index,
                            host: host_of(&url),
                            url,
                        })
                    })
                    .collect(),
            })
            .collect();
        Self { routes }
    }

    /// The URLs `outcome` goes to, in route-name order; empty: unrouted.
    pub fn targets(&self, outcome: &OutcomeHead) -> Vec<Arc<Target>> {
        let matched: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| !r.fallback && r.matches(outcome))
            .collect();
        let chosen: Vec<&Route> = if matched.is_empty() {
            self.routes.iter().filter(|r| r.fallback).collect()
        } else {
            matched
        };
        chosen
            .into_iter()
            .flat_map(|r| r.targets.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use secrecy::SecretString;

    fn route(url: &str, f: impl FnOnce(&mut RouteConfig)) -> RouteConfig {
        let mut r = RouteConfig {
            url: Some(SecretString::from(url.to_owned())),
            ..Default::default()
        };
        f(&mut r);
        r
    }

    fn outcome(status: &str, source: &str, event_type: &str) -> OutcomeHead {
        OutcomeHead {
            id: "id".into(),
            event_id: "evt".into(),
            member_id: Some("mem_1".into()),
            source: source.into(),
            event_type: event_type.into(),
            status: status.into(),
        }
    }

    fn names(router: &Router, o: &OutcomeHead) -> Vec<String> {
        router
            .targets(o)
            .iter()
            .map(|t| format!("{}#{}@{}", t.route, t.index, t.host))
            .collect()
    }

    #[test]
    fn routes_by_status_event_type_and_source_with_a_fallback() {
        let mut cfg = BridgeConfig::default();
        cfg.routes.insert(
            "applied".into(),
            route("https://hook.eu1.make.com/aaa", |r| {
                r.statuses = vec![crate::merge::outcome::Status::Applied]
            }),
        );
        cfg.routes.insert(
            "plans".into(),
            route(
                "https://hook.eu1.make.com/bbb, https://hook.us1.make.com:8443/ccc",
                |r| r.event_types = vec!["member.plan.*".into(), "customer.subscription.*".into()],
            ),
        );
        cfg.routes.insert(
            "supabase".into(),
            route("https://hook.eu1.make.com/ddd", |r| {
                r.sources = vec!["supabase".into()];
                r.statuses = vec![crate::merge::outcome::Status::Failed];
            }),
        );
        cfg.routes.insert(
            "rest".into(),
            route("https://hook.eu1.make.com/eee", |r| r.fallback = true),
        );
        let router = Router::new(&cfg);
        assert_eq!(
            names(
                &router,
                &outcome("applied", "memberstack", "member.updated")
            ),
            ["applied#0@hook.eu1.make.com"]
        );
        assert_eq!(
            names(
                &router,
                &outcome("applied", "memberstack", "member.plan.updated")
            ),
            [
                "applied#0@hook.eu1.make.com",
                "plans#0@hook.eu1.make.com",
                "plans#1@hook.us1.make.com:8443"
            ]
        );
        assert_eq!(
            names(&router, &outcome("failed", "supabase", "u")),
            ["supabase#0@hook.eu1.make.com"]
        );
        assert_eq!(
            names(&router, &outcome("skipped", "stripe", "invoice.paid")),
            ["rest#0@hook.eu1.make.com"],
            "nothing else matched: the fallback"
        );
        cfg.routes.remove("rest");
        let router = Router::new(&cfg);
        assert!(names(&router, &outcome("skipped", "stripe", "invoice.paid")).is_empty());
    }

    #[test]
    fn event_type_patterns() {
        assert!(event_type_matches("*", "member.updated"));
        assert!(event_type_matches("member.*", "member.plan.added"));
        assert!(event_type_matches("u", "u"));
        assert!(!event_type_matches("member.plan.*", "member.updated"));
        assert!(!event_type_matches("member.updated", "member.updated.x"));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let mut cfg = BridgeConfig::default();
        cfg.routes.insert(
            "all".into(),
            route("https://hook.eu1.make.com/s3cr3t-token", |_| {}),
        );
        let router = Router::new(&cfg);
        let t = router.targets(&outcome("applied", "memberstack", "member.updated"));
        let shown = format!("{t:?}");
        assert!(shown.contains("hook.eu1.make.com"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
    }
}
