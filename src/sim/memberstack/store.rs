//! The member store. Every mutation that really changes a member queues its webhook while
//! the store lock is held, so the webhook queue has the same order as the changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Map;

use super::model::{
    Member, MemberAuth, MemberPatch, NewMember, PlanChange, PlanConnection, member_payload, new_id,
    normalize_email, now_iso, plan_is_active, plan_payload,
};
use super::webhooks::Outbox;
use crate::sim::SimError;

struct Entry {
    member: Member,
    /// Unix ms of the last change (the webhook body's `timestamp`).
    changed_ms: i64,
}

/// One page of `GET /members`.
pub(crate) struct Page {
    pub total: usize,
    pub end_cursor: u64,
    pub has_next: bool,
    pub members: Vec<Member>,
}

pub(crate) struct Store {
    /// Keyed by the per-member sequence number, which is also the list cursor.
    by_seq: BTreeMap<u64, Entry>,
    seq_of: HashMap<String, u64>,
    /// Email → sequence number: creates and email changes check uniqueness in O(1), so
    /// benchmarks can hold 100k members.
    seq_of_email: HashMap<String, u64>,
    next_seq: u64,
    plan_names: HashMap<String, String>,
    outbox: Arc<Outbox>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Store {
    pub fn new(plan_names: HashMap<String, String>, outbox: Arc<Outbox>) -> Self {
        Self {
            by_seq: BTreeMap::new(),
            seq_of: HashMap::new(),
            seq_of_email: HashMap::new(),
            next_seq: 1,
            plan_names,
            outbox,
        }
    }

    pub fn get(&self, id: &str) -> Option<&Member> {
        self.seq_of
            .get(id)
            .and_then(|s| self.by_seq.get(s))
            .map(|e| &e.member)
    }

    pub fn changed_ms(&self, id: &str) -> Option<i64> {
        self.seq_of
            .get(id)
            .and_then(|s| self.by_seq.get(s))
            .map(|e| e.changed_ms)
    }

    pub fn find(&self, id_or_email: &str) -> Option<&Member> {
        self.get(id_or_email).or_else(|| {
            let email = normalize_email(id_or_email);
            self.seq_of_email
                .get(&email)
                .and_then(|s| self.by_seq.get(s))
                .map(|e| &e.member)
        })
    }

    pub fn all(&self) -> Vec<Member> {
        self.by_seq.values().map(|e| e.member.clone()).collect()
    }

    fn email_taken(&self, email: &str, except: Option<&str>) -> bool {
        self.seq_of_email
            .get(email)
            .and_then(|s| self.by_seq.get(s))
            .is_some_and(|e| Some(e.member.id.as_str()) != except)
    }

    /// `limit` members after cursor `after` (0 = from the start) in the given order.
    pub fn page(&self, after: u64, limit: usize, descending: bool) -> Page {
        // Only the page and one more entry are visited: a page costs O(limit), not O(n).
        let mut rest: Box<dyn Iterator<Item = (&u64, &Entry)>> = if descending {
            let upper = if after == 0 { u64::MAX } else { after };
            Box::new(self.by_seq.range(..upper).rev())
        } else {
            Box::new(self.by_seq.range(after.saturating_add(1)..))
        };
        let page: Vec<(u64, &Entry)> = rest.by_ref().take(limit).map(|(s, e)| (*s, e)).collect();
        Page {
            total: self.by_seq.len(),
            end_cursor: page.last().map_or(0, |(s, _)| *s),
            has_next: rest.next().is_some(),
            members: page.iter().map(|(_, e)| e.member.clone()).collect(),
        }
    }

    fn connection(&self, plan_id: &str, plan_type: &str, status: &str) -> PlanConnection {
        PlanConnection {
            id: new_id("con"),
            active: plan_is_active(status),
            status: status.to_owned(),
            plan_id: plan_id.to_owned(),
            plan_name: self
                .plan_names
                .get(plan_id)
                .cloned()
                .unwrap_or_else(|| plan_id.to_owned()),
            plan_type: plan_type.to_owned(),
            payment: None,
        }
    }

    /// Creates a member → `member.created` (initial plans are part of its payload).
    pub fn create(&mut self, new: NewMember) -> Result<Member, SimError> {
        let email = new
            .email
            .as_deref()
            .map(normalize_email)
            .filter(|e| super::model::plausible_email(e))
            .ok_or_else(|| SimError::Invalid("a valid email is required".into()))?;
        if self.email_taken(&email, None) {
            return Err(SimError::EmailInUse(email));
        }
        let plan_connections = new
            .plans
            .iter()
            .map(|p| self.connection(&p.plan_id, "FREE", "ACTIVE"))
            .collect();
        let member = Member {
            id: new_id("mem"),
            auth: MemberAuth { email },
            verified: false,
            meta_data: new.meta_data.unwrap_or_default(),
            custom_fields: new.custom_fields.unwrap_or_default(),
            json: new
                .json
                .unwrap_or_else(|| serde_json::Value::Object(Map::new())),
            login_redirect: new.login_redirect,
            profile_image: None,
            stripe_customer_id: None,
            last_login: None,
            created_at: now_iso(),
            permissions: vec![],
            plan_connections,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let changed_ms = now_ms();
        self.seq_of.insert(member.id.clone(), seq);
        self.seq_of_email.insert(member.auth.email.clone(), seq);
        self.by_seq.insert(
            seq,
            Entry {
                member: member.clone(),
                changed_ms,
            },
        );
        self.outbox.enqueue(
            "member.created",
            &member.id,
            changed_ms,
            member_payload(&member),
        );
        Ok(member)
    }

    fn entry_mut(&mut self, id: &str) -> Result<&mut Entry, SimError> {
        self.seq_of
            .get(id)
            .and_then(|s| self.by_seq.get_mut(s))
            .ok_or_else(|| SimError::MemberNotFound(id.to_owned()))
    }

    /// Applies a patch → `member.updated`, only if something changed.
    pub fn update(&mut self, id: &str, patch: &MemberPatch) -> Result<Member, SimError> {
        if let Some(email) = &patch.email {
            let email = normalize_email(email);
            if !super::model::plausible_email(&email) {
                return Err(SimError::Invalid("invalid email".into()));
            }
            if self.email_taken(&email, Some(id)) {
                return Err(SimError::EmailInUse(email));
            }
        }
        let entry = self.entry_mut(id)?;
        let old_email = entry.member.auth.email.clone();
        if !patch.apply(&mut entry.member) {
            return Ok(entry.member.clone());
        }
        entry.changed_ms = now_ms();
        let new_email = entry.member.auth.email.clone();
        if new_email != old_email
            && let Some(seq) = self.seq_of_email.remove(&old_email)
        {
            self.seq_of_email.insert(new_email, seq);
        }
        let entry = self.entry_mut(id)?;
        let (member, ms) = (entry.member.clone(), entry.changed_ms);
        self.outbox
            .enqueue("member.updated", id, ms, member_payload(&member));
        Ok(member)
    }

    /// Sets the member's Stripe customer, as a Stripe checkout does. No webhook: the
    /// documented `member.updated` payload does not carry `stripeCustomerId`; the member
    /// object (`GET /members/:id`) does.
    pub fn set_stripe_customer(&mut self, id: &str, customer: &str) -> Result<(), SimError> {
        let entry = self.entry_mut(id)?;
        entry.member.stripe_customer_id = Some(customer.to_owned());
        Ok(())
    }

    /// Deletes a member → `member.deleted`.
    pub fn delete(&mut self, id: &str) -> Result<(), SimError> {
        let seq = self
            .seq_of
            .remove(id)
            .ok_or_else(|| SimError::MemberNotFound(id.to_owned()))?;
        if let Some(e) = self.by_seq.remove(&seq) {
            self.seq_of_email.remove(&e.member.auth.email);
        }
        self.outbox.enqueue(
            "member.deleted",
            id,
            now_ms(),
            serde_json::json!({"id": id}),
        );
        Ok(())
    }

    /// Changes a plan connection. `None` when nothing changed (no webhook).
    pub fn change_plan(
        &mut self,
        id: &str,
        change: PlanChange,
        remove_on_cancel: bool,
    ) -> Result<Option<PlanConnection>, SimError> {
        let new_connection = match &change {
            PlanChange::Add {
                plan_id,
                plan_type,
                status,
                ..
            } => Some(self.connection(
                plan_id,
                plan_type.as_deref().unwrap_or("FREE"),
                &status.as_deref().unwrap_or("ACTIVE").to_uppercase(),
            )),
            _ => None,
        };
        let entry = self.entry_mut(id)?;
        let conns = &mut entry.member.plan_connections;
        let (event, connection) = match change {
            PlanChange::Add {
                plan_id, plan_name, ..
            } => {
                if conns.iter().any(|c| c.plan_id == plan_id && c.active) {
                    return Ok(None);
                }
                let mut c = new_connection.expect("built above for Add");
                if let Some(name) = plan_name {
                    c.plan_name = name;
                }
                conns.retain(|old| old.plan_id != plan_id);
                conns.push(c.clone());
                ("member.plan.added", c)
            }
            PlanChange::Update {
                plan_id,
                status,
                active,
            } => {
                let status = status.to_uppercase();
                let c = conns
                    .iter_mut()
                    .find(|c| c.plan_id == plan_id)
                    .ok_or_else(|| SimError::Invalid(format!("no connection to {plan_id}")))?;
                let active = active.unwrap_or_else(|| plan_is_active(&status));
                if c.status == status && c.active == active {
                    return Ok(None);
                }
                c.status = status;
                c.active = active;
                ("member.plan.updated", c.clone())
            }
            PlanChange::Cancel { plan_id } => {
                let Some(pos) = conns.iter().position(|c| c.plan_id == plan_id) else {
                    return Ok(None);
                };
                if !remove_on_cancel && conns[pos].status == "CANCELED" {
                    return Ok(None);
                }
                let mut c = if remove_on_cancel {
                    conns.remove(pos)
                } else {
                    conns[pos].clone()
                };
                c.status = "CANCELED".into();
                c.active = false;
                if !remove_on_cancel {
                    conns[pos] = c.clone();
                }
                ("member.plan.canceled", c)
            }
        };
        entry.changed_ms = now_ms();
        let ms = entry.changed_ms;
        self.outbox
            .enqueue(event, id, ms, plan_payload(id, &connection));
        Ok(Some(connection))
    }
}
