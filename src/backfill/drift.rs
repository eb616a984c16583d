//! The dry run's drift report: Memberstack's members (paged like the pass) against the
//! `members` rows, per mapped field, with merge's own field mapping and normalisation, so
//! "equal" here is what merge calls equal (`ACTIVE` = `active`, `1` = `"1"`, case of emails,
//! a missing metaData key = `{}`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::Client;

use crate::config::{Authority, FieldMapping};
use crate::merge::change::snapshot_field_value;
use crate::merge::normalize::{canonical, same};
use crate::sinks::memberstack::{Member, MemberstackClient, MemberstackError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Memberstack has a value, Supabase none.
    OnlyInMemberstack,
    /// Supabase has a value, Memberstack none.
    OnlyInSupabase,
    /// Both have a value and they differ.
    Different,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnlyInMemberstack => "only_in_memberstack",
            Self::OnlyInSupabase => "only_in_supabase",
            Self::Different => "different",
        }
    }
}

/// One field of one member that differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDrift {
    pub member_id: String,
    pub field: String,
    pub category: Category,
    /// Who wins when merge reconciles it (`latest`: the newer change).
    pub authority: Authority,
    pub memberstack: Value,
    pub supabase: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DriftCounts {
    pub only_in_memberstack: usize,
    pub only_in_supabase: usize,
    pub different: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DriftReport {
    pub memberstack_members: usize,
    pub supabase_rows: usize,
    /// Members without a row: the backfill creates the row (and auth user).
    pub members_only_in_memberstack: Vec<String>,
    /// Rows without a member (deleted in Memberstack, or never there): reported, never
    /// deleted.
    pub members_only_in_supabase: Vec<String>,
    /// Field drift of members present on both sides.
    pub fields: Vec<FieldDrift>,
    pub counts: DriftCounts,
}

/// Every member, in list order (`includeJSON=true`, so `json.<key>` fields compare too).
pub async fn memberstack_members(
    client: &MemberstackClient,
    page_size: u32,
) -> Result<Vec<Member>, MemberstackError> {
    let mut members = Vec::new();
    let mut after = None;
    loop {
        let page = client.list_members(after, page_size, true).await?;
        let more = page.has_next_page && !page.data.is_empty();
        after = Some(page.end_cursor);
        members.extend(page.data);
        if !more {
            return Ok(members);
        }
    }
}

/// Every `members` row as JSON, by Memberstack id.
pub async fn supabase_rows(db: &Client) -> Result<BTreeMap<String, Value>, tokio_postgres::Error> {
    let rows = db
        .query(
            "select memberstack_id, to_jsonb(m) from public.members m",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Value>(1)))
        .collect())
}

/// No value, the way merge sees it: null, `""`, or an empty object.
fn absent(field: &FieldMapping, v: &Value) -> bool {
    match canonical(field.normalize, v) {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

fn column(field: &FieldMapping, row: &Value) -> Value {
    let v = row.get(&field.supabase).cloned().unwrap_or(Value::Null);
    if v.is_null() && crate::merge::store::is_object_column(&field.supabase) {
        Value::Object(Map::new())
    } else {
        v
    }
}

pub fn compare(
    fields: &[FieldMapping],
    members: &[Member],
    rows: &BTreeMap<String, Value>,
) -> DriftReport {
    let mut report = DriftReport {
        memberstack_members: members.len(),
        supabase_rows: rows.len(),
        ..Default::default()
    };
    let mut seen = BTreeSet::new();
    for member in members {
        seen.insert(member.id.as_str());
        let Some(row) = rows.get(&member.id) else {
            report.members_only_in_memberstack.push(member.id.clone());
            continue;
        };
        for field in fields {
            let ms = snapshot_field_value(&member.raw, field);
            let sb = column(field, row);
            if same(field.normalize, &ms, &sb) {
                continue;
            }
            let category = match (absent(field, &ms), absent(field, &sb)) {
                (false, true) => Category::OnlyInMemberstack,
                (true, false) => Category::OnlyInSupabase,
                _ => Category::Different,
            };
            match category {
                Category::OnlyInMemberstack => report.counts.only_in_memberstack += 1,
                Category::OnlyInSupabase => report.counts.only_in_supabase += 1,
                Category::Different => report.counts.different += 1,
            }
            report.fields.push(FieldDrift {
                member_id: member.id.clone(),
                field: field.name.clone(),
                category,
                authority: field.authority,
                memberstack: ms,
                supabase: sb,
            });
        }
    }
    report.members_only_in_supabase = rows
        .keys()
        .filter(|id| !seen.contains(id.as_str()))
        .cloned()
        .collect();
    report
}

fn cell(v: &Value, width: usize) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > width {
        let cut: String = s.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// Lists of ids longer than this are shortened in the table (`--json` has them all).
const IDS_SHOWN: usize = 20;

fn id_list(ids: &[String]) -> String {
    let mut s = ids
        .iter()
        .take(IDS_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > IDS_SHOWN {
        let _ = write!(s, ", … ({} more)", ids.len() - IDS_SHOWN);
    }
    s
}

impl DriftReport {
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
            && self.members_only_in_memberstack.is_empty()
            && self.members_only_in_supabase.is_empty()
    }

    /// The human-readable report (stdout of `backfill --dry-run`).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Memberstack members: {}   Supabase rows: {}",
            self.memberstack_members, self.supabase_rows
        );
        let _ = writeln!(
            out,
            "members only in Memberstack (backfill creates them): {}",
            self.members_only_in_memberstack.len()
        );
        if !self.members_only_in_memberstack.is_empty() {
            let _ = writeln!(out, "  {}", id_list(&self.members_only_in_memberstack));
        }
        let _ = writeln!(
            out,
            "rows only in Supabase (reported, never deleted): {}",
            self.members_only_in_supabase.len()
        );
        if !self.members_only_in_supabase.is_empty() {
            let _ = writeln!(out, "  {}", id_list(&self.members_only_in_supabase));
        }
        let c = &self.counts;
        let _ = writeln!(
            out,
            "field drift: {} (only in Memberstack {}, only in Supabase {}, different {})",
            self.fields.len(),
            c.only_in_memberstack,
            c.only_in_supabase,
            c.different
        );
        if self.fields.is_empty() {
            return out;
        }
        let rows: Vec<[String; 6]> = self
            .fields
            .iter()
            .map(|d| {
                [
                    d.member_id.clone(),
                    d.field.clone(),
                    d.category.as_str().to_owned(),
                    d.authority.as_str().to_owned(),
                    cell(&d.memberstack, 40),
                    cell(&d.supabase, 40),
                ]
            })
            .collect();
        let header = [
            "member",
            "field",
            "drift",
            "authority",
            "memberstack",
            "supabase",
        ];
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[&str]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    let pad = w.saturating_sub(c.chars().count());
                    let _ = write!(l, "{c}{}  ", " ".repeat(pad));
                }
            }
            l
        };
        let _ = writeln!(out, "{}", line(&header));
        for r in &rows {
            let cells: Vec<&str> = r.iter().map(String::as_str).collect();
            let _ = writeln!(out, "{}", line(&cells));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(v: Value) -> Member {
        Member::from_value(v).unwrap()
    }

    #[test]
    fn compares_with_merge_normalisation_and_sorts_into_categories() {
        let fields = crate::config::default_fields();
        let members = vec![
            // Equal by merge's rules: email case, ACTIVE = active, 1 = "1", no metaData = {}.
            member(json!({"id": "mem_same", "auth": {"email": "A@X.io"},
                "customFields": {"n": 1, "blank": ""},
                "planConnections": [{"planId": "pln_1", "status": "ACTIVE", "active": true}]})),
            member(json!({"id": "mem_drift", "auth": {"email": "new@x.io"},
                "customFields": {"tier": "gold"}, "metaData": {"usage_stats": {"runs": 1}},
                "planConnections": []})),
            member(json!({"id": "mem_new", "auth": {"email": "n@x.io"}})),
        ];
        let rows: BTreeMap<String, Value> = [
            ("mem_same", json!({"email": "a@x.io", "custom_fields": {"n": "1"},
                "subscription_status": "active", "plan_id": "pln_1", "project_data": {}, "usage_stats": {}})),
            ("mem_drift", json!({"email": "old@x.io", "custom_fields": {},
                "subscription_status": "free", "plan_id": null,
                "project_data": {"p": 1}, "usage_stats": {}})),
            ("mem_gone", json!({"email": "g@x.io"})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let r = compare(&fields, &members, &rows);
        assert_eq!(r.members_only_in_memberstack, vec!["mem_new"]);
        assert_eq!(r.members_only_in_supabase, vec!["mem_gone"]);
        let got: Vec<(&str, &str, Category)> = r
            .fields
            .iter()
            .map(|d| (d.member_id.as_str(), d.field.as_str(), d.category))
            .collect();
        assert_eq!(
            got,
            vec![
                ("mem_drift", "email", Category::Different),
                ("mem_drift", "custom_fields", Category::OnlyInMemberstack),
                ("mem_drift", "project_data", Category::OnlyInSupabase),
                ("mem_drift", "usage_stats", Category::OnlyInMemberstack),
            ]
        );
        assert_eq!(
            r.counts,
            DriftCounts {
                only_in_memberstack: 2,
                only_in_supabase: 1,
                different: 1
            }
        );
        let table = r.table();
        assert!(table.contains("field drift: 4"), "{table}");
        assert!(table.contains("mem_drift  email"), "{table}");
    }
}
