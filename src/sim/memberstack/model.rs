//! The Member object and the request bodies that change it (docs/external-services.md §1.4, §2).

use chrono::{SecondsFormat, Utc};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// A Memberstack member as the Admin API returns it (SDK 1.7.0 `payload.d.ts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub id: String,
    pub auth: MemberAuth,
    pub verified: bool,
    pub meta_data: Map<String, Value>,
    pub custom_fields: Map<String, Value>,
    pub json: Value,
    pub login_redirect: Option<String>,
    pub profile_image: Option<String>,
    pub stripe_customer_id: Option<String>,
    pub last_login: Option<String>,
    pub created_at: String,
    pub permissions: Vec<String>,
    pub plan_connections: Vec<PlanConnection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberAuth {
    pub email: String,
}

/// One plan connection. `status` is uppercase as the Admin API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanConnection {
    pub id: String,
    pub active: bool,
    pub status: String,
    pub plan_id: String,
    pub plan_name: String,
    #[serde(rename = "type")]
    pub plan_type: String,
    pub payment: Option<Value>,
}

/// A plan reference in `POST /members` (`plans: [{planId}]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanRef {
    pub plan_id: String,
}

/// Body of `POST /members` (and of a dashboard create, where the password is optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewMember {
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub plans: Vec<PlanRef>,
    #[serde(default)]
    pub custom_fields: Option<Map<String, Value>>,
    #[serde(default)]
    pub meta_data: Option<Map<String, Value>>,
    #[serde(default)]
    pub json: Option<Value>,
    #[serde(default)]
    pub login_redirect: Option<String>,
}

impl NewMember {
    pub fn with_email(email: impl Into<String>) -> Self {
        Self {
            email: Some(email.into()),
            password: Some("sim-password".into()),
            ..Self::default()
        }
    }
}

/// Body of `PATCH /members/:id` (and of a dashboard update).
///
/// `customFields` and `metaData` are shallow-merged: each given key replaces the stored
/// value, a key given as `null` is stored as `null` (not removed), keys not given stay.
/// `json` is replaced whole. `loginRedirect` / `profileImage` are only changed when a string
/// is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberPatch {
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub custom_fields: Option<Map<String, Value>>,
    #[serde(default)]
    pub meta_data: Option<Map<String, Value>>,
    #[serde(default)]
    pub json: Option<Value>,
    #[serde(default)]
    pub verified: Option<bool>,
    #[serde(default)]
    pub login_redirect: Option<String>,
    #[serde(default)]
    pub profile_image: Option<String>,
}

impl MemberPatch {
    /// Applies the patch; returns whether anything changed (a no-op sends no webhook).
    pub fn apply(&self, member: &mut Member) -> bool {
        let before = member.clone();
        if let Some(email) = &self.email {
            member.auth.email = normalize_email(email);
        }
        if let Some(fields) = &self.custom_fields {
            member
                .custom_fields
                .extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(meta) = &self.meta_data {
            member
                .meta_data
                .extend(meta.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(json) = &self.json {
            member.json = json.clone();
        }
        if let Some(verified) = self.verified {
            member.verified = verified;
        }
        if let Some(redirect) = &self.login_redirect {
            member.login_redirect = Some(redirect.clone());
        }
        if let Some(image) = &self.profile_image {
            member.profile_image = Some(image.clone());
        }
        *member != before
    }
}

/// A dashboard change to a member's plan connections (JSON: `{"action": "add", "planId": …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "action",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum PlanChange {
    /// Connects a plan (default type `FREE`, status `ACTIVE`) → `member.plan.added`.
    Add {
        plan_id: String,
        #[serde(default)]
        plan_name: Option<String>,
        #[serde(default, rename = "type")]
        plan_type: Option<String>,
        #[serde(default)]
        status: Option<String>,
    },
    /// Changes the status of the member's connection to `plan_id` → `member.plan.updated`.
    /// `active` defaults to status ∈ {ACTIVE, TRIALING}.
    Update {
        plan_id: String,
        status: String,
        #[serde(default)]
        active: Option<bool>,
    },
    /// Cancels the connection (kept, status `CANCELED`, inactive) → `member.plan.canceled`.
    Cancel { plan_id: String },
}

pub(crate) fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// A very loose check: something@something.
pub(crate) fn plausible_email(email: &str) -> bool {
    let email = email.trim();
    matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@'))
        && !email.chars().any(char::is_whitespace)
}

/// `<prefix>_` + 25 lowercase alphanumerics, the shape of Memberstack's cuid-like ids.
pub(crate) fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..25)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}_{tail}")
}

pub(crate) fn now_iso() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn plan_is_active(status: &str) -> bool {
    matches!(status, "ACTIVE" | "TRIALING")
}

/// The payload of `member.created` / `member.updated` (no `json`: webhook payloads do not
/// document it).
pub(crate) fn member_payload(m: &Member) -> Value {
    json!({
        "id": m.id,
        "auth": { "email": m.auth.email },
        "metaData": m.meta_data,
        "customFields": m.custom_fields,
        "planConnections": m.plan_connections,
        "verified": m.verified,
        "createdAt": m.created_at,
    })
}

/// The payload of `member.plan.*`.
pub(crate) fn plan_payload(member_id: &str, c: &PlanConnection) -> Value {
    json!({
        "id": member_id,
        "planConnection": {
            "id": c.id,
            "active": c.active,
            "status": c.status,
            "planId": c.plan_id,
            "planName": c.plan_name,
            "type": c.plan_type,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> Member {
        Member {
            id: new_id("mem"),
            auth: MemberAuth {
                email: "a@example.com".into(),
            },
            verified: false,
            meta_data: Map::new(),
            custom_fields: json!({"a": 1, "b": 2}).as_object().unwrap().clone(),
            json: json!({"x": 1}),
            login_redirect: None,
            profile_image: None,
            stripe_customer_id: None,
            last_login: None,
            created_at: now_iso(),
            permissions: vec![],
            plan_connections: vec![],
        }
    }

    #[test]
    fn patch_merges_fields_and_replaces_json() {
        let mut m = member();
        let patch: MemberPatch =
            serde_json::from_value(json!({"customFields": {"b": null, "c": 3}, "json": {"y": 2}}))
                .unwrap();
        assert!(patch.apply(&mut m));
        assert_eq!(
            Value::Object(m.custom_fields.clone()),
            json!({"a": 1, "b": null, "c": 3})
        );
        assert_eq!(m.json, json!({"y": 2}));
        assert!(!patch.apply(&mut m), "second application changes nothing");
    }

    #[test]
    fn ids_and_emails() {
        let id = new_id("mem");
        assert!(id.starts_with("mem_") && id.len() == 29);
        assert!(plausible_email("a@b"));
        assert!(!plausible_email("ab"));
        assert!(!plausible_email("a b@c"));
        assert_eq!(normalize_email(" A@B.com "), "a@b.com");
    }

    #[test]
    fn plan_change_json_shape() {
        let c: PlanChange = serde_json::from_value(
            json!({"action": "add", "planId": "pln_1", "type": "SUBSCRIPTION"}),
        )
        .unwrap();
        assert_eq!(
            c,
            PlanChange::Add {
                plan_id: "pln_1".into(),
                plan_name: None,
                plan_type: Some("SUBSCRIPTION".into()),
                status: None
            }
        );
    }
}
