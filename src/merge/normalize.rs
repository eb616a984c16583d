//! How values of a field are compared across the two sides (`merge.fields[].normalize`).
//! Memberstack and Postgres spell the same fact differently: `"ACTIVE"` vs `active`,
//! custom field `"1"` vs `1`, `A@x.com` vs `a@x.com`. Equality here decides whether a change
//! is real, so it is what keeps the sync from ping-ponging on spelling.

use serde_json::{Map, Value};

use crate::config::Normalize;

/// The sync rules' subscription statuses (the `members.subscription_status` check).
pub const PLAN_STATUSES: [&str; 4] = ["active", "inactive", "cancelled", "free"];

/// Maps a Memberstack / Stripe plan status to the sync rules' enum. No plan (null) is
/// `free`; trialing counts as active (Stripe: safe to provision); a cancelled or expired
/// subscription is `cancelled`; anything that does not grant access is `inactive`.
pub fn plan_status(raw: &Value) -> &'static str {
    let Some(s) = raw.as_str() else {
        return "free";
    };
    match s.trim().to_ascii_lowercase().as_str() {
        "" | "free" => "free",
        "active" | "trialing" => "active",
        "canceled" | "cancelled" | "incomplete_expired" | "ended" => "cancelled",
        // past_due, unpaid, incomplete, paused, sca, inactive and unknown values.
        _ => "inactive",
    }
}

/// The value as the comparison sees it.
pub fn canonical(normalize: Normalize, value: &Value) -> Value {
    match normalize {
        Normalize::None => value.clone(),
        Normalize::PlanStatus => {
            // Already-normalised values (read back from Postgres) map to themselves.
            Value::String(plan_status(value).to_owned())
        }
        Normalize::CaseInsensitive => match value {
            Value::String(s) => Value::String(s.trim().to_lowercase()),
            other => other.clone(),
        },
        Normalize::CustomFields => match value {
            Value::Object(m) => Value::Object(custom_fields(m)),
            Value::Null => Value::Object(Map::new()),
            other => scalar_text(other),
        },
    }
}

/// Whether two values of a field are the same fact.
pub fn same(normalize: Normalize, a: &Value, b: &Value) -> bool {
    canonical(normalize, a) == canonical(normalize, b)
}

/// Custom fields: scalars compared as text (`1` = `"1"`, `true` = `"true"`), and a key set
/// to null or `""` is the same as an absent key (Memberstack clears a field to `""`).
fn custom_fields(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(_, v)| !v.is_null() && v.as_str() != Some(""))
        .map(|(k, v)| (k.clone(), scalar_text(v)))
        .collect()
}

fn scalar_text(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Bool(b) => Value::String(b.to_string()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plan_status_is_case_insensitive_and_total() {
        assert_eq!(plan_status(&json!("ACTIVE")), "active");
        assert_eq!(plan_status(&json!("trialing")), "active");
        assert_eq!(plan_status(&json!("CANCELED")), "cancelled");
        assert_eq!(plan_status(&json!("past_due")), "inactive");
        assert_eq!(plan_status(&json!("SCA")), "inactive");
        assert_eq!(plan_status(&Value::Null), "free");
        for s in PLAN_STATUSES {
            assert_eq!(
                plan_status(&json!(s)),
                s,
                "normalised values are fixed points"
            );
        }
    }

    #[test]
    fn custom_fields_compare_string_and_number_alike() {
        let n = Normalize::CustomFields;
        assert!(same(
            n,
            &json!({"seats": 1, "vip": true}),
            &json!({"seats": "1", "vip": "true"})
        ));
        assert!(same(n, &json!({"a": "", "b": null}), &json!({})));
        assert!(!same(n, &json!({"seats": 1}), &json!({"seats": "2"})));
        assert!(same(n, &Value::Null, &json!({})));
    }

    #[test]
    fn emails_compare_case_insensitively() {
        assert!(same(
            Normalize::CaseInsensitive,
            &json!("A@X.com"),
            &json!("a@x.com ")
        ));
        assert!(!same(Normalize::None, &json!("A@X.com"), &json!("a@x.com")));
    }
}
