//! `membersync check`: one line per prerequisite, ✓ or ✗ with a hint that says how to fix it.

mod kafka;
mod postgres;
mod roles;
mod services;

use std::fmt;

use crate::config::Config;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub ok: bool,
    pub label: String,
    pub detail: String,
    /// What to do about a ✗ (never set on ✓).
    pub hint: Option<String>,
}

impl Item {
    pub fn pass(label: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            ok: true,
            label: label.into(),
            detail: detail.into(),
            hint: None,
        }
    }

    pub fn fail(
        label: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self {
            ok: false,
            label: label.into(),
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok { '✓' } else { '✗' };
        write!(f, "{mark} {}: {}", self.label, self.detail)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    fix: {hint}")?;
        }
        Ok(())
    }
}

/// Runs every check. Postgres, the duty roles, Kafka and the external services are checked
/// concurrently; the order of the returned items is stable (Postgres, roles, Kafka, services).
pub async fn run(config: &Config) -> Vec<Item> {
    let (mut pg, roles, kafka, services) = tokio::join!(
        postgres::check(config),
        roles::check(config),
        kafka::check(config),
        services::check(config)
    );
    pg.extend(roles);
    pg.extend(kafka);
    pg.extend(services);
    pg
}
