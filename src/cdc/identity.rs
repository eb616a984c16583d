//! The replica identity of captured tables, and which operations are published.
//!
//! A Debezium consumer needs the whole old row in `before` (Flink's `debezium-json` refuses an
//! update without one), and only REPLICA IDENTITY FULL makes Postgres log it. CDC therefore
//! sets the identity `cdc.replica_identity` names when it starts, as Debezium's
//! `replica.identity.autoset.values` does (V18 sets `members` to FULL at migration time, for a
//! daemon role that does not own the table). The trade-off is documented in `docs/cdc.md`.

use serde::Deserialize;
use tokio_postgres::Client;

use super::envelope::Op;

/// A replica identity CDC can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaIdentity {
    /// The whole old row on every update and delete: complete `before` images, and unchanged
    /// TOASTed values filled in `after`. More WAL per update.
    Full,
    /// The primary key only: `before` is null on updates that keep the key.
    Default,
}

impl ReplicaIdentity {
    fn code(self) -> i8 {
        match self {
            ReplicaIdentity::Full => b'f' as i8,
            ReplicaIdentity::Default => b'd' as i8,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Default => "default",
        }
    }
}

/// Parses Debezium's `skipped.operations` (`c`, `u`, `d`, `t`, comma-separated, or `none`).
pub fn skipped_operations(text: &str) -> Result<Vec<Op>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") || text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|op| match op.trim() {
            "c" => Ok(Op::Create),
            "u" => Ok(Op::Update),
            "d" => Ok(Op::Delete),
            "t" => Ok(Op::Truncate),
            other => Err(format!(
                "`{other}` is not one of c, u, d, t (comma-separated), or `none`"
            )),
        })
        .collect()
}

/// Gives every captured table listed in `cdc.replica_identity` that identity. A table the
/// daemon role may not alter is left as it is, with a warning naming the statement to run.
pub async fn apply(client: &Client, config: &crate::config::CdcConfig) {
    for (table, wanted) in &config.replica_identity {
        if !config.tables.contains(table) {
            continue;
        }
        let current: Option<i8> = match client
            .query_opt(
                "select relreplident::\"char\" from pg_class where oid = to_regclass($1)",
                &[table],
            )
            .await
        {
            Ok(row) => row.map(|r| r.get(0)),
            Err(e) => {
                tracing::warn!(table, error = %e, "cannot read the replica identity");
                continue;
            }
        };
        if current.is_none() || current == Some(wanted.code()) {
            continue;
        }
        let (schema, name) = table.split_once('.').expect("validated schema.table");
        let statement = format!(
            "alter table \"{schema}\".\"{name}\" replica identity {}",
            wanted.sql()
        );
        match client.batch_execute(&statement).await {
            Ok(()) => tracing::info!(table, identity = wanted.sql(), "replica identity set"),
            Err(e) => tracing::warn!(
                table,
                error = %e,
                "cannot set the replica identity cdc.replica_identity asks for; run `{statement}` as the table's owner"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_operations_parse_as_debezium_spells_them() {
        assert_eq!(skipped_operations("t").unwrap(), vec![Op::Truncate]);
        assert_eq!(skipped_operations("none").unwrap(), vec![]);
        assert_eq!(
            skipped_operations("c, d").unwrap(),
            vec![Op::Create, Op::Delete]
        );
        assert!(skipped_operations("r").is_err());
        assert!(skipped_operations("x,t").is_err());
    }
}
