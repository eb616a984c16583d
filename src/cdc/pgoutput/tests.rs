use super::encode::encode;
use super::*;
use proptest::prelude::*;

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("valid hex in test")
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(s.as_bytes().to_vec())
}

fn col(is_key: bool, name: &str, type_oid: u32, type_modifier: i32) -> ColumnDef {
    ColumnDef {
        is_key,
        name: name.to_owned(),
        type_oid,
        type_modifier,
    }
}

// ---- Golden messages captured from PostgreSQL 15.18 (pgoutput, proto_version '1') with
// pg_logical_slot_peek_binary_changes on scratch tables:
//   golden_pgo_a (id int8 primary key, name text, big text, tags text[], amount numeric,
//                 at timestamptz, flag bool, raw bytea)            -- REPLICA IDENTITY DEFAULT
//   golden_pgo_b (id int4, note varchar(20))                       -- REPLICA IDENTITY FULL
//   golden_pgo_c (id int2 primary key, mood golden_mood)           -- enum type

const GOLDEN_BEGIN: &str = "4200000000222d56480003044a60845aa1000009a1";
const GOLDEN_COMMIT: &str = "430000000000222d564800000000222d56780003044a60845aa1";
const GOLDEN_RELATION_A: &str = "5200007d237075626c696300676f6c64656e5f70676f5f61006400080169640000000014ffffffff006e616d650000000019ffffffff006269670000000019ffffffff007461677300000003f1ffffffff00616d6f756e7400000006a4ffffffff00617400000004a0ffffffff00666c61670000000010ffffffff007261770000000011ffffffff";
/// insert into golden_pgo_a values (3, 'Bo', 'short', array['x',null,'y z'], 'NaN',
///   '2024-06-30 23:59:59.5-07', false, '\x00');
const GOLDEN_INSERT_A: &str = "4900007d234e00087400000001337400000002426f740000000573686f7274740000000e7b782c4e554c4c2c2279207a227d74000000034e614e7400000018323032342d30372d30312030363a35393a35392e352b303074000000016674000000045c783030";
/// update golden_pgo_a set id = 4, name = 'Bob' where id = 3;  (key changed → 'K' tuple)
const GOLDEN_UPDATE_KEY: &str = "5500007d234b00087400000001336e6e6e6e6e6e6e4e00087400000001347400000003426f62740000000573686f7274740000000e7b782c4e554c4c2c2279207a227d74000000034e614e7400000018323032342d30372d30312030363a35393a35392e352b303074000000016674000000045c783030";
/// delete from golden_pgo_a where id = 4;
const GOLDEN_DELETE_KEY: &str = "4400007d234b00087400000001346e6e6e6e6e6e6e";
/// update golden_pgo_a set name = 'Toasted' where id = 10;  (`big` is 6400 incompressible
/// bytes stored out of line → 'u')
const GOLDEN_UPDATE_TOAST: &str =
    "5500007d234e0008740000000231307400000007546f6173746564756e6e6e6e6e";
const GOLDEN_RELATION_B: &str = "5200007d2a7075626c696300676f6c64656e5f70676f5f62006600020169640000000017ffffffff016e6f7465000000041300000018";
/// update golden_pgo_b set note = 'SEVEN' where id = 7;  (REPLICA IDENTITY FULL → 'O')
const GOLDEN_UPDATE_FULL: &str =
    "5500007d2a4f00027400000001377400000005736576656e4e00027400000001377400000005534556454e";
/// delete from golden_pgo_b where id = 8;  (note was NULL)
const GOLDEN_DELETE_FULL: &str = "4400007d2a4f00027400000001386e";
/// truncate golden_pgo_a, golden_pgo_b restart identity cascade;
const GOLDEN_TRUNCATE: &str = "54000000020300007d2300007d2a";
/// select pg_logical_emit_message(true, 'membersync.origin', 'hello');
const GOLDEN_MESSAGE_TX: &str =
    "4d0100000000222d37486d656d62657273796e632e6f726967696e000000000568656c6c6f";
/// select pg_logical_emit_message(false, 'membersync.hb', '');
const GOLDEN_MESSAGE_NONTX: &str = "4d0000000000222d55786d656d62657273796e632e68620000000000";
/// Transaction replayed under replication origin 'golden_origin' with
/// pg_replication_origin_xact_setup('0/ABCDEF', …).
const GOLDEN_ORIGIN: &str = "4f0000000000abcdef676f6c64656e5f6f726967696e00";
const GOLDEN_TYPE: &str = "5900007d377075626c696300676f6c64656e5f6d6f6f6400";
const GOLDEN_RELATION_C: &str = "5200007d3b7075626c696300676f6c64656e5f70676f5f63006400020169640000000015ffffffff006d6f6f640000007d37ffffffff";

fn golden(hex: &str) -> Message {
    let bytes = unhex(hex);
    let msg = decode(&bytes).expect("golden message decodes");
    assert_eq!(
        encode(&msg),
        bytes,
        "re-encoding reproduces the server's bytes"
    );
    msg
}

#[test]
fn golden_begin_commit() {
    assert_eq!(
        golden(GOLDEN_BEGIN),
        Message::Begin(BeginMessage {
            final_lsn: 0x222D_5648,
            commit_time: 0x0003_044a_6084_5aa1,
            xid: 2465,
        })
    );
    let Message::Commit(c) = golden(GOLDEN_COMMIT) else {
        panic!("not a commit")
    };
    assert_eq!(c.flags, 0);
    assert_eq!(c.commit_lsn, 0x222D_5648);
    assert_eq!(c.end_lsn, 0x222D_5678);
    assert_eq!(c.commit_time, 0x0003_044a_6084_5aa1);
    // 2026-11-28, when the golden bytes were captured.
    let ms = pg_micros_to_unix_millis(c.commit_time);
    let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap();
    assert_eq!(dt.format("%Y-%m-%d").to_string(), "2026-11-28");
}

#[test]
fn golden_relation_default_identity() {
    let Message::Relation(r) = golden(GOLDEN_RELATION_A) else {
        panic!("not a relation")
    };
    assert_eq!(r.id, 0x7d23);
    assert_eq!(r.namespace, "public");
    assert_eq!(r.name, "golden_pgo_a");
    assert_eq!(r.replica_identity, ReplicaIdentity::Default);
    assert_eq!(
        r.columns,
        vec![
            col(true, "id", 20, -1),
            col(false, "name", 25, -1),
            col(false, "big", 25, -1),
            col(false, "tags", 1009, -1),
            col(false, "amount", 1700, -1),
            col(false, "at", 1184, -1),
            col(false, "flag", 16, -1),
            col(false, "raw", 17, -1),
        ]
    );
}

#[test]
fn golden_relation_full_identity() {
    let Message::Relation(r) = golden(GOLDEN_RELATION_B) else {
        panic!("not a relation")
    };
    assert_eq!(r.name, "golden_pgo_b");
    assert_eq!(r.replica_identity, ReplicaIdentity::Full);
    // varchar(20): typmod = 20 + VARHDRSZ; FULL flags every column as key.
    assert_eq!(
        r.columns,
        vec![col(true, "id", 23, -1), col(true, "note", 1043, 24)]
    );
}

#[test]
fn golden_type_and_enum_relation() {
    assert_eq!(
        golden(GOLDEN_TYPE),
        Message::Type(TypeMessage {
            id: 0x7d37,
            namespace: "public".into(),
            name: "golden_mood".into(),
        })
    );
    let Message::Relation(r) = golden(GOLDEN_RELATION_C) else {
        panic!("not a relation")
    };
    assert_eq!(
        r.columns,
        vec![col(true, "id", 21, -1), col(false, "mood", 0x7d37, -1)]
    );
}

fn row_a(id: &str, name: &str) -> Tuple {
    Tuple(vec![
        text(id),
        text(name),
        text("short"),
        text("{x,NULL,\"y z\"}"),
        text("NaN"),
        text("2024-07-01 06:59:59.5+00"),
        text("f"),
        text("\\x00"),
    ])
}

#[test]
fn golden_insert() {
    assert_eq!(
        golden(GOLDEN_INSERT_A),
        Message::Insert(InsertMessage {
            relation_id: 0x7d23,
            new: row_a("3", "Bo"),
        })
    );
}

#[test]
fn golden_update_with_key() {
    let mut key = vec![TupleValue::Null; 8];
    key[0] = text("3");
    assert_eq!(
        golden(GOLDEN_UPDATE_KEY),
        Message::Update(UpdateMessage {
            relation_id: 0x7d23,
            old: Some(OldTuple::Key(Tuple(key))),
            new: row_a("4", "Bob"),
        })
    );
}

#[test]
fn golden_update_unchanged_toast() {
    assert_eq!(
        golden(GOLDEN_UPDATE_TOAST),
        Message::Update(UpdateMessage {
            relation_id: 0x7d23,
            old: None,
            new: Tuple(vec![
                text("10"),
                text("Toasted"),
                TupleValue::UnchangedToast,
                TupleValue::Null,
                TupleValue::Null,
                TupleValue::Null,
                TupleValue::Null,
                TupleValue::Null,
            ]),
        })
    );
}

#[test]
fn golden_update_with_old_row() {
    assert_eq!(
        golden(GOLDEN_UPDATE_FULL),
        Message::Update(UpdateMessage {
            relation_id: 0x7d2a,
            old: Some(OldTuple::Full(Tuple(vec![text("7"), text("seven")]))),
            new: Tuple(vec![text("7"), text("SEVEN")]),
        })
    );
}

#[test]
fn golden_deletes() {
    let mut key = vec![TupleValue::Null; 8];
    key[0] = text("4");
    assert_eq!(
        golden(GOLDEN_DELETE_KEY),
        Message::Delete(DeleteMessage {
            relation_id: 0x7d23,
            old: OldTuple::Key(Tuple(key)),
        })
    );
    assert_eq!(
        golden(GOLDEN_DELETE_FULL),
        Message::Delete(DeleteMessage {
            relation_id: 0x7d2a,
            old: OldTuple::Full(Tuple(vec![text("8"), TupleValue::Null])),
        })
    );
}

#[test]
fn golden_truncate() {
    let Message::Truncate(t) = golden(GOLDEN_TRUNCATE) else {
        panic!("not a truncate")
    };
    assert_eq!(t.relation_ids, vec![0x7d23, 0x7d2a]);
    assert!(t.cascade());
    assert!(t.restart_identity());
}

#[test]
fn golden_logical_messages_and_origin() {
    assert_eq!(
        golden(GOLDEN_MESSAGE_TX),
        Message::Message(LogicalMessage {
            transactional: true,
            lsn: 0x222D_3748,
            prefix: "membersync.origin".into(),
            content: b"hello".to_vec(),
        })
    );
    assert_eq!(
        golden(GOLDEN_MESSAGE_NONTX),
        Message::Message(LogicalMessage {
            transactional: false,
            lsn: 0x222D_5578,
            prefix: "membersync.hb".into(),
            content: vec![],
        })
    );
    assert_eq!(
        golden(GOLDEN_ORIGIN),
        Message::Origin(OriginMessage {
            commit_lsn: 0xABCDEF,
            name: "golden_origin".into(),
        })
    );
}

#[test]
fn truncate_option_bits() {
    let t = TruncateMessage {
        options: 0,
        relation_ids: vec![1],
    };
    assert!(!t.cascade() && !t.restart_identity());
    let t = TruncateMessage {
        options: TruncateMessage::CASCADE,
        relation_ids: vec![],
    };
    assert!(t.cascade() && !t.restart_identity());
    let t = TruncateMessage {
        options: TruncateMessage::RESTART_IDENTITY,
        relation_ids: vec![],
    };
    assert!(!t.cascade() && t.restart_identity());
}

#[test]
fn binary_column_values() {
    let msg = Message::Insert(InsertMessage {
        relation_id: 5,
        new: Tuple(vec![TupleValue::Binary(vec![0, 0, 0, 7]), TupleValue::Null]),
    });
    let bytes = encode(&msg);
    assert_eq!(&bytes[5..8], b"N\x00\x02");
    assert_eq!(bytes[8], b'b');
    assert_eq!(decode(&bytes).unwrap(), msg);
}

#[test]
fn empty_and_unknown_tag() {
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    assert_eq!(decode(b"Z123"), Err(DecodeError::UnknownTag { tag: b'Z' }));
    // Protocol v2+ stream messages are not part of v1.
    assert_eq!(decode(b"S"), Err(DecodeError::UnknownTag { tag: b'S' }));
    let e = decode(&[0xff]).unwrap_err().to_string();
    assert!(e.contains("0xff"), "{e}");
}

#[test]
fn truncation_reports_offset_and_field() {
    let bytes = unhex(GOLDEN_BEGIN);
    assert_eq!(
        decode(&bytes[..10]),
        Err(DecodeError::Truncated {
            message: "begin",
            field: "commit timestamp",
            offset: 9,
            needed: 8,
            available: 1,
        })
    );
    // Every strict prefix of every golden message fails cleanly.
    for hex in [
        GOLDEN_BEGIN,
        GOLDEN_COMMIT,
        GOLDEN_RELATION_A,
        GOLDEN_INSERT_A,
        GOLDEN_UPDATE_KEY,
        GOLDEN_UPDATE_FULL,
        GOLDEN_UPDATE_TOAST,
        GOLDEN_DELETE_FULL,
        GOLDEN_TRUNCATE,
        GOLDEN_MESSAGE_TX,
        GOLDEN_ORIGIN,
        GOLDEN_TYPE,
    ] {
        let bytes = unhex(hex);
        for n in 1..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "{hex} prefix {n} decoded");
        }
    }
}

#[test]
fn truncated_column_value() {
    // Insert, relation 1, one text column claiming 10 bytes but carrying 3.
    let bytes = b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x0aabc";
    assert_eq!(
        decode(bytes),
        Err(DecodeError::Truncated {
            message: "insert",
            field: "tuple column value",
            offset: 13,
            needed: 10,
            available: 3,
        })
    );
    let msg = decode(bytes).unwrap_err().to_string();
    assert_eq!(
        msg,
        "insert message truncated at offset 13: tuple column value needs 10 byte(s), 3 available"
    );
}

#[test]
fn invalid_utf8_name() {
    let bytes = b"Y\x00\x00\x00\x01pub\x00\xff\xfe\x00";
    assert_eq!(
        decode(bytes),
        Err(DecodeError::InvalidUtf8 {
            message: "type",
            field: "type name",
            offset: 9,
        })
    );
}

#[test]
fn unterminated_string() {
    let bytes = b"O\x00\x00\x00\x00\x00\x00\x00\x01origin";
    assert_eq!(
        decode(bytes),
        Err(DecodeError::UnterminatedString {
            message: "origin",
            field: "origin name",
            offset: 9,
        })
    );
}

#[test]
fn bad_replica_identity() {
    let bytes = b"R\x00\x00\x00\x01s\x00t\x00x\x00\x00";
    assert_eq!(
        decode(bytes),
        Err(DecodeError::UnknownReplicaIdentity {
            offset: 9,
            value: b'x'
        })
    );
}

#[test]
fn bad_column_kind_and_markers() {
    assert_eq!(
        decode(b"I\x00\x00\x00\x01N\x00\x01x"),
        Err(DecodeError::UnknownColumnKind {
            message: "insert",
            offset: 8,
            kind: b'x'
        })
    );
    assert_eq!(
        decode(b"I\x00\x00\x00\x01K\x00\x00"),
        Err(DecodeError::UnexpectedTupleMarker {
            message: "insert",
            offset: 5,
            expected: "'N'",
            found: b'K'
        })
    );
    // Update with an old key must be followed by 'N'.
    assert_eq!(
        decode(b"U\x00\x00\x00\x01K\x00\x00K\x00\x00"),
        Err(DecodeError::UnexpectedTupleMarker {
            message: "update",
            offset: 8,
            expected: "'N'",
            found: b'K'
        })
    );
    // Delete has no new tuple.
    assert_eq!(
        decode(b"D\x00\x00\x00\x01N\x00\x00"),
        Err(DecodeError::UnexpectedTupleMarker {
            message: "delete",
            offset: 5,
            expected: "'K' or 'O'",
            found: b'N'
        })
    );
}

#[test]
fn negative_lengths() {
    assert_eq!(
        decode(b"I\x00\x00\x00\x01N\xff\xff"),
        Err(DecodeError::NegativeLength {
            message: "insert",
            field: "number of tuple columns",
            offset: 6,
            value: -1
        })
    );
    assert_eq!(
        decode(b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xfe"),
        Err(DecodeError::NegativeLength {
            message: "insert",
            field: "tuple column length",
            offset: 9,
            value: -2
        })
    );
    assert!(matches!(
        decode(b"T\x80\x00\x00\x00\x00"),
        Err(DecodeError::NegativeLength { .. })
    ));
}

#[test]
fn huge_counts_do_not_allocate() {
    // Truncate claiming 2^31-1 relations, Relation claiming 32767 columns, tuple claiming
    // 32767 columns: all fail on the first missing element, with no huge allocation.
    assert!(matches!(
        decode(b"T\x7f\xff\xff\xff\x00"),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        decode(b"R\x00\x00\x00\x01\x00\x00d\x7f\xff"),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        decode(b"I\x00\x00\x00\x01N\x7f\xff"),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        decode(b"M\x00\x00\x00\x00\x00\x00\x00\x00\x00p\x00\x7f\xff\xff\xff"),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn trailing_bytes_rejected() {
    let mut bytes = unhex(GOLDEN_DELETE_FULL);
    bytes.push(0);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TrailingBytes {
            message: "delete",
            offset: 15,
            remaining: 1
        })
    );
}

#[test]
fn pg_epoch_conversion() {
    assert_eq!(pg_micros_to_unix_millis(0), 946_684_800_000);
    assert_eq!(pg_micros_to_unix_millis(-1), 946_684_799_999);
    assert_eq!(pg_micros_to_unix_micros(i64::MAX), i64::MAX);
}

// ---- property tests

fn name() -> impl Strategy<Value = String> {
    // C strings: anything but NUL.
    "[^\u{0}]{0,12}"
}

fn tuple_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(TupleValue::Text),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(TupleValue::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(tuple_value(), 0..6).prop_map(Tuple)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| ColumnDef {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin(BeginMessage {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(CommitMessage {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        ),
        (any::<u64>(), name())
            .prop_map(|(commit_lsn, name)| Message::Origin(OriginMessage { commit_lsn, name })),
        (
            any::<u32>(),
            name(),
            name(),
            replica_identity(),
            proptest::collection::vec(column, 0..6)
        )
            .prop_map(|(id, namespace, name, replica_identity, columns)| {
                Message::Relation(RelationMessage {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), name(), name()).prop_map(|(id, namespace, name)| Message::Type(
            TypeMessage {
                id,
                namespace,
                name
            }
        )),
        (any::<u32>(), tuple())
            .prop_map(|(relation_id, new)| Message::Insert(InsertMessage { relation_id, new })),
        (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(
            |(relation_id, old, new)| Message::Update(UpdateMessage {
                relation_id,
                old,
                new
            })
        ),
        (any::<u32>(), old_tuple())
            .prop_map(|(relation_id, old)| Message::Delete(DeleteMessage { relation_id, old })),
        (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6)).prop_map(
            |(options, relation_ids)| Message::Truncate(TruncateMessage {
                options,
                relation_ids
            })
        ),
        (
            any::<bool>(),
            any::<u64>(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(transactional, lsn, prefix, content)| {
                Message::Message(LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&data);
    }

    #[test]
    fn tagged_bytes_never_panic(
        tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut data = vec![tag];
        data.extend(rest);
        let _ = decode(&data);
    }

    #[test]
    fn encode_decode_roundtrip(msg in message()) {
        let bytes = encode(&msg);
        prop_assert_eq!(decode(&bytes), Ok(msg));
    }

    #[test]
    fn mutated_messages_never_panic(
        msg in message(),
        idx in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode(&msg);
        let i = idx.index(bytes.len());
        bytes[i] = byte;
        let n = cut.index(bytes.len() + 1);
        let _ = decode(&bytes[..n]);
    }
}
