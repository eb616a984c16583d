//! Where a mapped field lives in a Memberstack member (`merge.fields[].memberstack`), and how
//! to read it from a member or webhook payload and write it into a PATCH body.

use serde_json::{Map, Value};

/// A parsed Memberstack path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberstackPath {
    /// `auth.email`.
    Email,
    /// `customFields`: the whole object.
    CustomFields,
    /// `customFields.<key>`.
    CustomField(String),
    /// `metaData.<key>`.
    MetaData(String),
    /// `json.<key>` (Memberstack replaces `json` whole: writes are read-modify-write).
    Json(String),
    /// `planConnection.status`.
    PlanStatus,
    /// `planConnection.planId`.
    PlanId,
}

impl MemberstackPath {
    pub fn parse(path: &str) -> Result<Self, String> {
        let key = |rest: &str| -> Result<String, String> {
            if rest.is_empty() || rest.contains('.') {
                Err(format!("{path:?}: expected exactly one key after the dot"))
            } else {
                Ok(rest.to_owned())
            }
        };
        Ok(match path {
            "auth.email" => Self::Email,
            "customFields" => Self::CustomFields,
            "planConnection.status" => Self::PlanStatus,
            "planConnection.planId" => Self::PlanId,
            _ => {
                if let Some(rest) = path.strip_prefix("customFields.") {
                    Self::CustomField(key(rest)?)
                } else if let Some(rest) = path.strip_prefix("metaData.") {
                    Self::MetaData(key(rest)?)
                } else if let Some(rest) = path.strip_prefix("json.") {
                    Self::Json(key(rest)?)
                } else {
                    return Err(format!(
                        "{path:?} is not a Memberstack path: use auth.email, customFields, \
                         customFields.<key>, metaData.<key>, json.<key>, planConnection.status \
                         or planConnection.planId"
                    ));
                }
            }
        })
    }

    /// Memberstack's API cannot change a plan connection of a paid plan (Stripe checkout
    /// does): plan fields are read-only for the daemon.
    pub fn is_writable(&self) -> bool {
        !matches!(self, Self::PlanStatus | Self::PlanId)
    }

    /// Reads the value from a member object (or a webhook payload, which has the same
    /// shape). `None`: the object does not carry the field (a partial payload, or a key the
    /// member never had), which is different from `Some(Value::Null)`.
    pub fn get(&self, member: &Value) -> Option<Value> {
        match self {
            Self::Email => member.get("auth")?.get("email").cloned(),
            Self::CustomFields => member.get("customFields").cloned(),
            // An absent key says nothing (Memberstack merges keys and never removes one).
            Self::CustomField(k) => member.get("customFields")?.get(k).cloned(),
            Self::MetaData(k) => member.get("metaData")?.get(k).cloned(),
            Self::Json(k) => member.get("json")?.get(k).cloned(),
            Self::PlanStatus => plan_key(member, "status"),
            Self::PlanId => plan_key(member, "planId"),
        }
    }

    /// Adds the value to a PATCH body (`{email, customFields, metaData, json}`). `current`
    /// is the member as last read, needed for `json` (replaced whole by Memberstack).
    pub fn put(&self, patch: &mut Map<String, Value>, value: Value, current: Option<&Value>) {
        let object = |patch: &mut Map<String, Value>, name: &str| -> Map<String, Value> {
            match patch.remove(name) {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            }
        };
        match self {
            Self::Email => {
                patch.insert("email".into(), value);
            }
            Self::CustomFields => {
                // Memberstack shallow-merges customFields: every key is sent, a cleared one as
                // the empty string (docs/merge.md, "Removing a custom field").
                let mut merged = object(patch, "customFields");
                if let Value::Object(m) = value {
                    merged.extend(m.into_iter().map(|(k, v)| (k, cleared_as_empty(v))));
                }
                patch.insert("customFields".into(), Value::Object(merged));
            }
            Self::CustomField(k) => {
                let mut m = object(patch, "customFields");
                m.insert(k.clone(), cleared_as_empty(value));
                patch.insert("customFields".into(), Value::Object(m));
            }
            Self::MetaData(k) => {
                let mut m = object(patch, "metaData");
                m.insert(k.clone(), value);
                patch.insert("metaData".into(), Value::Object(m));
            }
            Self::Json(k) => {
                let mut m = match patch.remove("json") {
                    Some(Value::Object(m)) => m,
                    _ => current
                        .and_then(|c| c.get("json"))
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                };
                m.insert(k.clone(), value);
                patch.insert("json".into(), Value::Object(m));
            }
            Self::PlanStatus | Self::PlanId => {}
        }
    }

    /// Whether writing this path needs the member's current state first.
    pub fn needs_read_before_write(&self) -> bool {
        matches!(self, Self::Json(_))
    }
}

/// A custom field is text: no value is the empty string, a value Memberstack's shallow merge
/// stores like any other (null is not documented for it).
fn cleared_as_empty(v: Value) -> Value {
    if v.is_null() {
        Value::String(String::new())
    } else {
        v
    }
}

/// A key of the member's primary plan connection. No plan at all is a fact (null); a
/// connection that lacks the key does not carry it (`None`): it never nulls the column.
fn plan_key(member: &Value, key: &str) -> Option<Value> {
    match primary_plan(member)? {
        Value::Null => Some(Value::Null),
        connection => connection.get(key).filter(|v| !v.is_null()).cloned(),
    }
}

/// The plan connection that stands for the member's subscription: the first active paid one,
/// else the first active one, else the first. Plan webhooks carry a single `planConnection`
/// (merge replaces it with the member's re-read list when it can).
fn primary_plan(member: &Value) -> Option<Value> {
    if let Some(single) = member.get("planConnection").filter(|v| v.is_object()) {
        return Some(single.clone());
    }
    let list = member.get("planConnections")?.as_array()?;
    let active = |p: &&Value| p.get("active").and_then(Value::as_bool) == Some(true);
    let free = |p: &&Value| {
        p.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("free"))
    };
    // A paid subscription says more about the member than the free plan everyone has.
    let chosen = list
        .iter()
        .find(|p| active(p) && !free(p))
        .or_else(|| list.iter().find(active))
        .or(list.first());
    // An empty list: the member has no plan (Null), which is not "not in the payload".
    Some(chosen.cloned().unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_documented_path_and_rejects_others() {
        for p in [
            "auth.email",
            "customFields",
            "customFields.tier",
            "metaData.project_data",
            "json.usage",
            "planConnection.status",
            "planConnection.planId",
        ] {
            MemberstackPath::parse(p).unwrap();
        }
        for p in ["email", "metaData", "metaData.a.b", "json.", "plans.status"] {
            assert!(MemberstackPath::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn reads_plan_from_list_or_single_connection() {
        let m = json!({"planConnections": [
            {"planId": "pln_old", "status": "CANCELED", "active": false},
            {"planId": "pln_free", "status": "ACTIVE", "active": true, "type": "FREE"},
            {"planId": "pln_pro", "status": "ACTIVE", "active": true, "type": "SUBSCRIPTION"}
        ]});
        assert_eq!(MemberstackPath::PlanId.get(&m), Some(json!("pln_pro")));
        let single = json!({"planConnection": {"planId": "pln_x", "status": "CANCELED"}});
        assert_eq!(
            MemberstackPath::PlanStatus.get(&single),
            Some(json!("CANCELED"))
        );
        assert_eq!(
            MemberstackPath::PlanId.get(&json!({"planConnections": []})),
            Some(Value::Null)
        );
        assert_eq!(MemberstackPath::PlanId.get(&json!({"auth": {}})), None);
    }

    #[test]
    fn a_free_plan_never_hides_a_paid_one_and_a_missing_key_is_not_null() {
        // Issue #16, item 2: the whole list decides, whatever connection an event names.
        let m = json!({"planConnections": [
            {"planId": "pln_free", "status": "ACTIVE", "active": true, "type": "FREE"},
            {"planId": "pln_pro", "status": "ACTIVE", "active": true, "type": "SUBSCRIPTION"},
            {"planId": "pln_bonus", "status": "CANCELED", "active": false, "type": "FREE"}
        ]});
        assert_eq!(MemberstackPath::PlanId.get(&m), Some(json!("pln_pro")));
        assert_eq!(MemberstackPath::PlanStatus.get(&m), Some(json!("ACTIVE")));
        let no_id = json!({"planConnection": {"id": "con_1", "status": "ACTIVE"}});
        assert_eq!(MemberstackPath::PlanId.get(&no_id), None);
        assert_eq!(
            MemberstackPath::PlanStatus.get(&no_id),
            Some(json!("ACTIVE"))
        );
        let null_id = json!({"planConnections": [{"planId": null, "active": true}]});
        assert_eq!(MemberstackPath::PlanId.get(&null_id), None);
    }

    #[test]
    fn partial_payloads_are_not_nulls() {
        let deleted = json!({"id": "mem_1"});
        assert_eq!(MemberstackPath::Email.get(&deleted), None);
        assert_eq!(MemberstackPath::MetaData("a".into()).get(&deleted), None);
        let m = json!({"metaData": {"b": null}});
        assert_eq!(MemberstackPath::MetaData("a".into()).get(&m), None);
        assert_eq!(
            MemberstackPath::MetaData("b".into()).get(&m),
            Some(Value::Null)
        );
    }

    #[test]
    fn json_writes_keep_the_other_keys() {
        let current = json!({"json": {"keep": 1, "x": 0}});
        let mut patch = Map::new();
        MemberstackPath::Json("x".into()).put(&mut patch, json!(5), Some(&current));
        MemberstackPath::MetaData("m".into()).put(&mut patch, json!("v"), None);
        assert_eq!(
            Value::Object(patch),
            json!({"json": {"keep": 1, "x": 5}, "metaData": {"m": "v"}})
        );
    }
}
