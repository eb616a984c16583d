//! Topic names, all derived from `kafka.topic_prefix` (docs/topics.md).

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Memberstack webhook events.
    pub fn memberstack(&self) -> String {
        format!("{}.memberstack", self.prefix)
    }

    /// Stripe webhook events.
    pub fn stripe(&self) -> String {
        format!("{}.stripe", self.prefix)
    }

    /// Change events of one captured table.
    pub fn cdc(&self, schema: &str, table: &str) -> String {
        format!("{}.cdc.{schema}.{table}", self.prefix)
    }

    /// One outcome record per applied change.
    pub fn sync(&self) -> String {
        format!("{}.sync", self.prefix)
    }

    /// Merge's dead letters: poison records and changes or pushes that failed permanently.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// Outcomes the bridge could not deliver to Make.com (its own dead letters).
    pub fn bridge_dlq(&self) -> String {
        format!("{}.bridge.dlq", self.prefix)
    }

    /// Every topic the configuration implies, in a stable order.
    pub fn all(&self, config: &Config) -> Vec<String> {
        let mut topics = vec![self.memberstack(), self.stripe()];
        topics.extend(config.cdc.tables.iter().filter_map(|t| {
            let (schema, table) = t.split_once('.')?;
            Some(self.cdc(schema, table))
        }));
        topics.push(self.sync());
        topics.push(self.dlq());
        if config.bridge.enabled() {
            topics.push(self.bridge_dlq());
        }
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let t = Topics::new("membersync");
        assert_eq!(t.cdc("public", "members"), "membersync.cdc.public.members");
        assert_eq!(
            t.all(&Config::default()),
            [
                "membersync.memberstack",
                "membersync.stripe",
                "membersync.cdc.public.members",
                "membersync.sync",
                "membersync.dlq"
            ]
        );
        let mut with_bridge = Config::default();
        with_bridge
            .bridge
            .routes
            .insert("all".into(), Default::default());
        assert_eq!(
            t.all(&with_bridge).last().map(String::as_str),
            Some("membersync.bridge.dlq")
        );
    }
}
