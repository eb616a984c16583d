//! The dev services' settings, as the benches read them: `.dev/services.env` (written by
//! `scripts/dev-services up`), overridden by the environment's `MEMBERSYNC_DEV_*` variables
//! and `MEMBERSYNC__DATABASE__PASSWORD_FILE`. Each bench adds its own helpers in an
//! `impl Services` block of its own.

use std::collections::HashMap;
use std::path::Path;

pub struct Services {
    pub vars: HashMap<String, String>,
}

impl Services {
    pub fn load() -> Services {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/services.env");
        let mut vars: HashMap<String, String> = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect();
        for (k, v) in std::env::vars() {
            if k.starts_with("MEMBERSYNC_DEV_") || k == "MEMBERSYNC__DATABASE__PASSWORD_FILE" {
                vars.insert(k, v);
            }
        }
        assert!(
            vars.contains_key("MEMBERSYNC_DEV_PG_PORT")
                && vars.contains_key("MEMBERSYNC_DEV_KAFKA_BROKERS"),
            "the local services are not set up ({} missing): run `scripts/dev-services up` first",
            file.display()
        );
        Services { vars }
    }

    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{key} missing from .dev/services.env"))
    }
}
