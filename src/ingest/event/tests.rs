use super::*;
use proptest::prelude::*;
use serde_json::json;

fn ms(body: Value) -> Result<MemberstackEvent, ParseError> {
    parse_memberstack(&serde_json::to_vec(&body).unwrap())
}

fn stripe(body: Value) -> Result<StripeEvent, ParseError> {
    parse_stripe(&serde_json::to_vec(&body).unwrap())
}

// --- Memberstack: envelope variants ---------------------------------------------

#[test]
fn documented_member_created_with_payload() {
    // developers.memberstack.com/docs/webhooks example shape.
    let body = br#"{
        "event": "member.created",
        "timestamp": 1633486880169,
        "payload": {
            "id": "mem_abc123",
            "auth": { "email": "jane@example.com" },
            "metaData": { "plan": "gold" },
            "customFields": { "first-name": "Jane" }
        }
    }"#;
    let e = parse_memberstack(body).unwrap();
    assert_eq!(e.event, "member.created");
    assert_eq!(e.kind, MemberstackEventKind::MemberCreated);
    assert_eq!(e.member_id, "mem_abc123");
    assert_eq!(e.timestamp_ms, Some(1_633_486_880_169));
    assert_eq!(e.payload_key, PayloadKey::Payload);
    assert_eq!(e.payload.email.as_deref(), Some("jane@example.com"));
    assert_eq!(e.payload.custom_fields, Some(json!({"first-name": "Jane"})));
    assert_eq!(e.payload.meta_data, Some(json!({"plan": "gold"})));
    assert_eq!(e.raw["payload"]["id"], "mem_abc123");
}

#[test]
fn help_center_variant_with_data() {
    let e = ms(json!({
        "event": "member.updated",
        "timestamp": 1633486880169u64,
        "data": { "id": "mem_1", "customFields": {"x": 1}, "metadata": {"y": 2} }
    }))
    .unwrap();
    assert_eq!(e.kind, MemberstackEventKind::MemberUpdated);
    assert_eq!(e.payload_key, PayloadKey::Data);
    assert_eq!(e.member_id, "mem_1");
    assert_eq!(e.payload.meta_data, Some(json!({"y": 2})));
}

#[test]
fn type_is_an_alias_of_event() {
    let e = ms(json!({"type": "member.deleted", "payload": {"id": "mem_9"}})).unwrap();
    assert_eq!(e.event, "member.deleted");
    assert_eq!(e.kind, MemberstackEventKind::MemberDeleted);
    assert_eq!(e.timestamp_ms, None);
    // `event` wins when both are present; `payload` wins over `data`.
    let e = ms(json!({
        "event": "member.created", "type": "something.else",
        "payload": {"id": "mem_p"}, "data": {"id": "mem_d"}
    }))
    .unwrap();
    assert_eq!(e.kind, MemberstackEventKind::MemberCreated);
    assert_eq!(e.member_id, "mem_p");
    // A null `event` falls back to `type`.
    let e =
        ms(json!({"event": null, "type": "member.updated", "payload": {"id": "mem_1"}})).unwrap();
    assert_eq!(e.kind, MemberstackEventKind::MemberUpdated);
}

#[test]
fn plan_events_with_plan_connection() {
    let e = ms(json!({
        "event": "member.planConnection.created",
        "timestamp": 1633486880169i64,
        "payload": {
            "id": "mem_1",
            "planConnection": {"id": "con_1", "active": true, "status": "ACTIVE", "type": "SUBSCRIPTION"}
        }
    }))
    .unwrap();
    assert_eq!(e.kind, MemberstackEventKind::PlanAdded);
    assert_eq!(e.payload.plan_connection.unwrap()["id"], "con_1");

    let e = ms(json!({
        "event": "member.updated",
        "payload": {"id": "mem_1", "planConnections": [{"id": "con_1", "planId": "pln_1"}]}
    }))
    .unwrap();
    assert_eq!(e.payload.plan_connections.unwrap()[0]["planId"], "pln_1");
}

#[test]
fn team_events_use_member_id() {
    let e = ms(json!({
        "event": "team.member.added",
        "payload": {"memberId": "mem_t", "ownerId": "mem_o", "teamId": "team_1"}
    }))
    .unwrap();
    assert_eq!(e.kind, MemberstackEventKind::TeamMemberAdded);
    assert_eq!(e.member_id, "mem_t");
    assert_eq!(e.payload.owner_id.as_deref(), Some("mem_o"));
    assert_eq!(e.payload.team_id.as_deref(), Some("team_1"));
    // memberId wins over id for team events…
    let e =
        ms(json!({"event": "team.member.removed", "payload": {"id": "x_1", "memberId": "mem_t"}}))
            .unwrap();
    assert_eq!(e.member_id, "mem_t");
    // …and id is the fallback for them.
    let e = ms(json!({"event": "team.member.removed", "payload": {"id": "mem_x"}})).unwrap();
    assert_eq!(e.member_id, "mem_x");
    // A missing member on a team event names memberId.
    assert_eq!(
        ms(json!({"event": "team.member.added", "payload": {"teamId": "t"}})),
        Err(ParseError::MissingField("payload.memberId"))
    );
    // Member events fall back to memberId.
    let e = ms(json!({"event": "member.updated", "payload": {"memberId": "mem_m"}})).unwrap();
    assert_eq!(e.member_id, "mem_m");
}

#[test]
fn event_name_table() {
    use MemberstackEventKind::*;
    for (name, kind) in [
        ("member.created", MemberCreated),
        ("member.updated", MemberUpdated),
        ("member.deleted", MemberDeleted),
        ("member.plan.added", PlanAdded),
        ("member.plan.created", PlanAdded),
        ("member.planConnection.created", PlanAdded),
        ("member.plan.updated", PlanUpdated),
        ("member.planConnection.updated", PlanUpdated),
        ("member.plan.canceled", PlanCanceled),
        ("member.plan.cancelled", PlanCanceled),
        ("member.planConnection.canceled", PlanCanceled),
        ("team.member.added", TeamMemberAdded),
        ("team.member.removed", TeamMemberRemoved),
        ("MEMBER.CREATED", MemberCreated),
        ("member.plan.replaced", Unknown),
        ("member.something.new", Unknown),
        ("", Unknown),
    ] {
        assert_eq!(MemberstackEventKind::from_event_name(name), kind, "{name}");
    }
    assert_eq!(PlanCanceled.as_str(), "plan_canceled");
    assert_eq!(
        serde_json::to_value(TeamMemberAdded).unwrap(),
        json!("team_member_added")
    );
}

#[test]
fn unknown_event_names_are_accepted() {
    let e = ms(json!({"event": "member.plan.replaced", "payload": {"id": "mem_1"}})).unwrap();
    assert_eq!(e.kind, MemberstackEventKind::Unknown);
    assert_eq!(e.event, "member.plan.replaced");
}

#[test]
fn timestamp_variants() {
    for (ts, expected) in [
        (json!(1633486880169i64), Some(1_633_486_880_169)),
        (json!(1633486880169.7), Some(1_633_486_880_169)),
        (json!("1633486880169"), Some(1_633_486_880_169)),
        (json!(null), None),
    ] {
        let e = ms(json!({"event": "member.created", "timestamp": ts, "payload": {"id": "mem_1"}}))
            .unwrap();
        assert_eq!(e.timestamp_ms, expected, "{ts}");
    }
    for ts in [
        json!("yesterday"),
        json!(true),
        json!({}),
        json!(1e300),
        json!(u64::MAX),
    ] {
        assert_eq!(
            ms(json!({"event": "member.created", "timestamp": ts, "payload": {"id": "mem_1"}})),
            Err(ParseError::WrongType {
                field: "timestamp",
                expected: "number (Unix milliseconds)"
            }),
            "{ts}"
        );
    }
}

// --- Memberstack: errors ---------------------------------------------------------

#[test]
fn memberstack_errors() {
    assert_eq!(
        ms(json!({"event": "member.created", "payload": {}}))
            .unwrap_err()
            .to_string(),
        "payload.id is missing"
    );
    assert_eq!(
        ms(json!({"event": "member.created", "payload": {"id": null}})),
        Err(ParseError::MissingField("payload.id"))
    );
    assert_eq!(
        ms(json!({"event": "member.created", "data": {}})),
        Err(ParseError::MissingField("data.id"))
    );
    assert_eq!(
        ms(json!({"payload": {"id": "mem_1"}})),
        Err(ParseError::MissingField("event"))
    );
    assert_eq!(
        ms(json!({"event": "member.created"})),
        Err(ParseError::MissingField("payload"))
    );
    assert_eq!(
        ms(json!({"event": 5, "payload": {"id": "mem_1"}})),
        Err(ParseError::WrongType {
            field: "event",
            expected: "string"
        })
    );
    assert_eq!(
        ms(json!({"type": ["x"], "payload": {"id": "mem_1"}})),
        Err(ParseError::WrongType {
            field: "type",
            expected: "string"
        })
    );
    assert_eq!(
        ms(json!({"event": "", "payload": {"id": "mem_1"}})),
        Err(ParseError::WrongType {
            field: "event",
            expected: "non-empty string of at most 256 bytes"
        })
    );
    assert_eq!(
        ms(json!({"event": "member.created", "payload": "mem_1"})),
        Err(ParseError::WrongType {
            field: "payload",
            expected: "object"
        })
    );
    assert_eq!(
        ms(json!({"event": "member.created", "data": []})),
        Err(ParseError::WrongType {
            field: "data",
            expected: "object"
        })
    );
    assert_eq!(
        ms(json!({"event": "member.created", "payload": {"id": 42}})),
        Err(ParseError::WrongType {
            field: "payload.id",
            expected: "string"
        })
    );
    let bad_id = ParseError::WrongType {
        field: "payload.id",
        expected: "non-empty id without whitespace, at most 256 bytes",
    };
    for id in [
        json!(""),
        json!("mem 1"),
        json!("mem_\n"),
        json!("m".repeat(257)),
    ] {
        assert_eq!(
            ms(json!({"event": "member.created", "payload": {"id": id}})),
            Err(bad_id),
            "{id}"
        );
    }
    assert_eq!(
        ms(json!({"event": "member.created", "payload": {"memberId": ""}})),
        Err(ParseError::WrongType {
            field: "payload.memberId",
            expected: "non-empty id without whitespace, at most 256 bytes"
        })
    );
    // The chosen id field decides; a bad `id` does not matter on a team event…
    let e = ms(json!({"event": "team.member.added", "payload": {"id": 7, "memberId": "mem_t"}}))
        .unwrap();
    assert_eq!(e.member_id, "mem_t");
    assert_eq!(e.payload.id, None);
    // …but does on a member event, even when memberId could stand in.
    assert_eq!(
        ms(json!({"event": "member.created", "payload": {"id": 7, "memberId": "mem_t"}})),
        Err(ParseError::WrongType {
            field: "payload.id",
            expected: "string"
        })
    );
    assert_eq!(
        ms(json!({"event": "member.created", "data": {"memberId": false}})),
        Err(ParseError::WrongType {
            field: "data.memberId",
            expected: "string"
        })
    );
}

#[test]
fn informational_fields_of_odd_types_are_tolerated() {
    for payload in [
        json!({"id": "mem_1", "auth": "x", "ownerId": 1, "teamId": [], "stripeCustomerId": {}}),
        json!({"id": "mem_1", "auth": {"email": 1}}),
        json!({"id": "mem_1", "auth": null, "customFields": null}),
    ] {
        let e = ms(json!({"event": "member.created", "payload": payload})).unwrap();
        assert_eq!(e.member_id, "mem_1");
        assert_eq!(e.payload.email, None);
        assert_eq!(e.payload.owner_id, None);
        assert_eq!(e.payload.team_id, None);
        assert_eq!(e.payload.stripe_customer_id, None);
        assert_eq!(e.payload.custom_fields, None);
        assert_eq!(e.raw["payload"], payload);
    }
    let e = ms(json!({
        "event": "member.updated",
        "payload": {"id": "mem_1", "stripeCustomerId": "cus_1", "customFields": "odd"}
    }))
    .unwrap();
    assert_eq!(e.payload.stripe_customer_id.as_deref(), Some("cus_1"));
    assert_eq!(e.payload.custom_fields, Some(json!("odd")));
}

#[test]
fn not_json_and_not_object() {
    let err = parse_memberstack(b"{\n  \"event\": \"member.created\",\n  oops\n}").unwrap_err();
    assert_eq!(
        err,
        ParseError::NotJson {
            line: 3,
            column: 3,
            category: "syntax"
        }
    );
    assert_eq!(err.reason(), "not_json");
    assert!(!err.to_string().contains("oops"));
    assert!(matches!(
        parse_memberstack(b"{\"event\": \"member.cre"),
        Err(ParseError::NotJson {
            category: "eof",
            ..
        })
    ));
    assert!(matches!(
        parse_memberstack(b""),
        Err(ParseError::NotJson { .. })
    ));
    assert!(matches!(
        parse_memberstack(b"\xff\xfe"),
        Err(ParseError::NotJson { .. })
    ));
    // A string value containing a secret-looking token is not echoed.
    let err = parse_stripe(b"{\"id\": \"evt_1\", \"type\": \"sk_live_SECRET\" x}").unwrap_err();
    assert!(!err.to_string().contains("SECRET"), "{err}");
    for body in [&b"[]"[..], b"\"member.created\"", b"42", b"null", b"true"] {
        assert_eq!(parse_memberstack(body), Err(ParseError::NotAnObject));
        assert_eq!(parse_stripe(body), Err(ParseError::NotAnObject));
    }
    // Deep nesting hits serde_json's recursion limit instead of the stack.
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(matches!(
        parse_memberstack(deep.as_bytes()),
        Err(ParseError::NotJson { .. })
    ));
}

#[test]
fn parse_error_reasons() {
    assert_eq!(ParseError::NotAnObject.reason(), "not_an_object");
    assert_eq!(ParseError::MissingField("x").reason(), "missing_field");
    assert_eq!(
        ParseError::WrongType {
            field: "x",
            expected: "y"
        }
        .reason(),
        "wrong_type"
    );
}

// --- Stripe ----------------------------------------------------------------------

fn subscription_event(metadata: Value, customer: Value) -> Value {
    json!({
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "api_version": "2023-10-16",
        "created": 1686089970,
        "livemode": false,
        "type": "customer.subscription.updated",
        "data": {
            "object": {
                "id": "sub_1",
                "object": "subscription",
                "customer": customer,
                "status": "active",
                "metadata": metadata,
                "items": {"object": "list", "data": [
                    {"id": "si_1", "price": {"id": "price_gold", "object": "price"}},
                    {"id": "si_2", "price": {"id": "price_other", "object": "price"}}
                ]}
            },
            "previous_attributes": {"status": "trialing"}
        }
    })
}

#[test]
fn stripe_subscription_with_memberstack_id() {
    let e = stripe(subscription_event(
        json!({"memberstack_user_id": "mem_1"}),
        json!("cus_1"),
    ))
    .unwrap();
    assert_eq!(e.id, "evt_1NG8Du2eZvKYlo2CUI79vXWy");
    assert_eq!(e.event_type, "customer.subscription.updated");
    assert_eq!(e.created, Some(1_686_089_970));
    assert_eq!(e.livemode, Some(false));
    assert_eq!(e.api_version.as_deref(), Some("2023-10-16"));
    assert_eq!(e.previous_attributes, Some(json!({"status": "trialing"})));
    assert!(e.is_subscription_event());
    assert_eq!(
        e.subscription(),
        Some(StripeSubscription {
            id: Some("sub_1".into()),
            memberstack_id: Some("mem_1".into()),
            customer: Some("cus_1".into()),
            status: Some("active".into()),
            price_id: Some("price_gold".into()),
        })
    );
    assert_eq!(
        e.routing_key(),
        Some(RoutingKey {
            key: "mem_1".into(),
            needs_lookup: false
        })
    );
}

#[test]
fn stripe_routing_falls_back_to_customer() {
    // No metadata key; expanded customer object.
    let e = stripe(subscription_event(
        json!({}),
        json!({"id": "cus_9", "object": "customer"}),
    ))
    .unwrap();
    let sub = e.subscription().unwrap();
    assert_eq!(sub.memberstack_id, None);
    assert_eq!(sub.customer.as_deref(), Some("cus_9"));
    assert_eq!(
        e.routing_key(),
        Some(RoutingKey {
            key: "cus_9".into(),
            needs_lookup: true
        })
    );
    // An unusable metadata value also falls back.
    let e = stripe(subscription_event(
        json!({"memberstack_user_id": ""}),
        json!("cus_2"),
    ))
    .unwrap();
    assert_eq!(e.routing_key().unwrap().key, "cus_2");
    // customer.* events: the object is the customer.
    let e = stripe(json!({
        "id": "evt_2", "type": "customer.updated",
        "data": {"object": {"id": "cus_3", "object": "customer", "metadata": {}}}
    }))
    .unwrap();
    assert!(!e.is_subscription_event());
    assert_eq!(e.subscription(), None);
    assert_eq!(
        e.routing_key(),
        Some(RoutingKey {
            key: "cus_3".into(),
            needs_lookup: true
        })
    );
    // Nothing to route on.
    let e = stripe(json!({
        "id": "evt_3", "type": "terminal.reader.action_succeeded",
        "data": {"object": {"id": "rdr_123", "object": "terminal.reader"}}
    }))
    .unwrap();
    assert_eq!(e.routing_key(), None);
    assert_eq!(e.created, None);
}

#[test]
fn stripe_subscription_is_tolerant_of_odd_shapes() {
    let e = stripe(json!({
        "id": "evt_4", "type": "customer.subscription.deleted",
        "data": {"object": {"status": 5, "items": {"data": []}, "metadata": "x"}}
    }))
    .unwrap();
    assert_eq!(
        e.subscription(),
        Some(StripeSubscription {
            id: None,
            memberstack_id: None,
            customer: None,
            status: None,
            price_id: None
        })
    );
}

#[test]
fn stripe_python_dummy_payload_parses() {
    // stripe-python tests/test_webhook.py DUMMY_WEBHOOK_PAYLOAD: no `type`.
    let body = b"{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\",\n  \"data\": { \"object\": { \"id\": \"rdr_123\", \"object\": \"terminal.reader\" } }\n}";
    assert_eq!(parse_stripe(body), Err(ParseError::MissingField("type")));
}

#[test]
fn stripe_errors() {
    let ok = json!({"id": "evt_1", "type": "x.y", "created": 1, "data": {"object": {}}});
    assert!(stripe(ok.clone()).is_ok());
    let with = |key: &str, value: Value| {
        let mut v = ok.clone();
        v[key] = value;
        stripe(v)
    };
    let without = |key: &str| {
        let mut v = ok.clone();
        v.as_object_mut().unwrap().remove(key);
        stripe(v)
    };
    assert_eq!(without("id"), Err(ParseError::MissingField("id")));
    assert_eq!(without("type"), Err(ParseError::MissingField("type")));
    assert_eq!(without("data"), Err(ParseError::MissingField("data")));
    assert!(without("created").is_ok());
    assert_eq!(
        with("id", json!(7)),
        Err(ParseError::WrongType {
            field: "id",
            expected: "string"
        })
    );
    for id in ["ch_1", "evt_", "evt_ 1", ""] {
        let err = with("id", json!(id)).unwrap_err();
        assert_eq!(
            err,
            ParseError::WrongType {
                field: "id",
                expected: "event id starting with evt_"
            },
            "{id}"
        );
    }
    assert_eq!(
        with("type", json!(null)),
        Err(ParseError::MissingField("type"))
    );
    assert_eq!(
        with("type", json!({})),
        Err(ParseError::WrongType {
            field: "type",
            expected: "string"
        })
    );
    assert_eq!(
        with("created", json!("yesterday")),
        Err(ParseError::WrongType {
            field: "created",
            expected: "integer (Unix seconds)"
        })
    );
    assert_eq!(
        with("data", json!([])),
        Err(ParseError::WrongType {
            field: "data",
            expected: "object"
        })
    );
    assert_eq!(
        with("data", json!({})),
        Err(ParseError::MissingField("data.object"))
    );
    assert_eq!(
        with("data", json!({"object": "sub_1"})),
        Err(ParseError::WrongType {
            field: "data.object",
            expected: "object"
        })
    );
    // A v2 "thin" event is refused (ISO `created`, and no data.object).
    assert_eq!(
        stripe(
            json!({"id": "evt_234", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered", "livemode": true, "created": "2022-02-15T00:27:45.330Z"})
        ),
        Err(ParseError::WrongType {
            field: "created",
            expected: "integer (Unix seconds)"
        })
    );
}

#[test]
fn parsed_events_serialise() {
    let e = ms(json!({"event": "member.created", "payload": {"id": "mem_1"}})).unwrap();
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["kind"], "member_created");
    assert_eq!(v["member_id"], "mem_1");
    let back: MemberstackEvent = serde_json::from_value(v).unwrap();
    assert_eq!(back, e);
    let s = stripe(subscription_event(json!({}), json!("cus_1"))).unwrap();
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["type"], "customer.subscription.updated");
    assert_eq!(serde_json::from_value::<StripeEvent>(v).unwrap(), s);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_memberstack(&body);
        let _ = parse_stripe(&body);
    }

    #[test]
    fn parsers_never_panic_on_json_shapes(
        event in prop_oneof![Just(json!(null)), any::<String>().prop_map(Value::from), any::<i64>().prop_map(Value::from)],
        id in prop_oneof![Just(json!(null)), "[ -~]{0,20}".prop_map(Value::from), any::<f64>().prop_map(Value::from)],
        ts in prop_oneof![Just(json!(null)), any::<f64>().prop_map(Value::from), any::<u64>().prop_map(Value::from), "[0-9a-z]{0,25}".prop_map(Value::from)],
        use_data in any::<bool>(),
    ) {
        let key = if use_data { "data" } else { "payload" };
        let mut body = json!({"event": event, "timestamp": ts});
        body[key] = json!({"id": id.clone(), "memberId": id.clone(), "auth": {"email": id}});
        let _ = ms(body);
    }

    #[test]
    fn any_valid_member_id_round_trips(id in "[A-Za-z0-9_-]{1,64}", name in "[a-z.]{1,40}") {
        let e = ms(json!({"event": name, "payload": {"id": id.clone()}})).unwrap();
        prop_assert_eq!(e.member_id, id);
    }
}
