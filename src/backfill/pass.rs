//! The Memberstack pass: page `GET /members` (through the client's shared rate limiter),
//! publish every member as a `member.snapshot` on `<prefix>.memberstack`, and move the
//! persisted cursor only once every record of the page is acknowledged (at-least-once).
//!
//! The next page is fetched while the current one is being published and acknowledged, so
//! Kafka's round trips hide behind the rate limiter's spacing: the pass runs at the rate
//! limit, not at rate limit + publish time.

use std::time::Duration;

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::BackfillError;
use super::progress::Progress;
use super::state::{self, Run};
use crate::ingest::envelope;
use crate::kafka::producer::{Producer, Record};
use crate::sinks::memberstack::{Member, MemberPage, MemberstackClient};

/// What the pass did in this invocation (a resumed run counts only its own pages here).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassSummary {
    pub pages: u64,
    pub members: u64,
    pub list_requests: u64,
}

pub struct Pass<'a> {
    pub memberstack: &'a MemberstackClient,
    pub producer: &'a Producer,
    pub topic: &'a str,
    pub db: &'a Client,
    pub page_size: u32,
    /// How long a record may wait for room in the producer's queue.
    pub queue_wait: Duration,
}

/// The snapshot's event id (merge's exactly-once key): the run, the member and a digest of
/// the member as read. A page re-read after an interruption yields the same ids for members
/// that did not change, so merge skips them as duplicates; a member that changed meanwhile
/// gets a new id and is merged again, as it should be. A later run has other ids: it
/// reconciles again.
pub fn event_id(run_id: i64, member: &Member) -> String {
    let body = serde_json::to_vec(&member.raw).unwrap_or_default();
    let digest = Sha256::digest(&body);
    format!(
        "backfill_{run_id}_{}_{}",
        member.id,
        hex::encode(&digest[..8])
    )
}

impl Pass<'_> {
    pub async fn run(
        &self,
        run: &mut Run,
        progress: &Progress,
    ) -> Result<PassSummary, BackfillError> {
        let mut summary = PassSummary::default();
        let mut page = self.fetch(run.cursor, &mut summary).await?;
        loop {
            // An empty page ends the pass whatever it says: its cursor does not advance.
            let more = page.has_next_page && !page.data.is_empty();
            let cursor = page.end_cursor;
            let members = page.data.len() as u64;
            let total = page.total_count;
            let publish = async {
                self.publish(run.id, &page.data).await?;
                if members > 0 {
                    state::page_done(self.db, run, cursor, members, total).await?;
                }
                Ok::<_, BackfillError>(())
            };
            let next = if more {
                let mut fetched = PassSummary::default();
                let (published, next) =
                    tokio::join!(publish, self.fetch(Some(cursor), &mut fetched));
                summary.list_requests += fetched.list_requests;
                published?;
                Some(next?)
            } else {
                publish.await?;
                None
            };
            if members > 0 {
                summary.pages += 1;
                summary.members += members;
            }
            progress.page(run.pages_done, run.members_published, total);
            match next {
                Some(n) => page = n,
                None => break,
            }
        }
        Ok(summary)
    }

    async fn fetch(
        &self,
        after: Option<u64>,
        summary: &mut PassSummary,
    ) -> Result<MemberPage, BackfillError> {
        summary.list_requests += 1;
        Ok(self
            .memberstack
            .list_members(after, self.page_size, true)
            .await?)
    }

    /// Produces every member of the page at once and waits for all acknowledgements.
    async fn publish(&self, run_id: i64, members: &[Member]) -> Result<(), BackfillError> {
        let fetched_at = Utc::now();
        let records: Vec<envelope::IngestRecord> = members
            .iter()
            .map(|m| envelope::member_snapshot(&event_id(run_id, m), &m.raw, &m.id, fetched_at))
            .collect();
        let sends = records.iter().map(|record| async move {
            let headers: Vec<(&str, &[u8])> = record
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_bytes()))
                .collect();
            self.producer
                .send(
                    &Record {
                        topic: self.topic,
                        key: record.key.as_bytes(),
                        payload: &record.value,
                        headers: &headers,
                    },
                    self.queue_wait,
                )
                .await
        });
        futures::future::try_join_all(sends).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_ids_are_stable_per_run_and_content() {
        let m = Member::from_value(json!({"id": "mem_1", "customFields": {"a": 1}})).unwrap();
        let changed = Member::from_value(json!({"id": "mem_1", "customFields": {"a": 2}})).unwrap();
        assert_eq!(event_id(7, &m), event_id(7, &m.clone()));
        assert_ne!(event_id(7, &m), event_id(7, &changed));
        assert_ne!(event_id(7, &m), event_id(8, &m));
        assert!(event_id(7, &m).starts_with("backfill_7_mem_1_"));
    }
}
