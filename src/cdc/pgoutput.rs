//! Decoder for PostgreSQL's `pgoutput` logical replication protocol, **version 1**.
//!
//! Byte layouts follow "Logical Replication Message Formats" of the PostgreSQL 15 manual
//! (protocol-logicalrep-message-formats). All integers are big-endian; a `String` is a
//! NUL-terminated C string. Version 1 carries no streaming transaction ids, so none of the
//! "only present for streamed transactions" fields appear here.
//!
//! `pgwire-replication` parses Begin, Commit and Message itself and hands every other message
//! over as the raw `XLogData.data` bytes; [`decode`] handles all of them anyway, so captured
//! slot output (`pg_logical_slot_peek_binary_changes`) decodes too.
//!
//! The decoder is bounds-checked throughout: any input, however malformed, produces either a
//! [`Message`] or a [`DecodeError`] naming the offset and field where decoding stopped. It never
//! panics and never allocates more than the input can justify.

use thiserror::Error;

/// Microseconds between the Unix epoch (1970-01-01) and the PostgreSQL epoch (2000-01-01).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01 UTC, as in Begin and Commit)
/// to microseconds since the Unix epoch (saturating).
pub fn pg_micros_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS)
}

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01 UTC) to milliseconds since the
/// Unix epoch, rounding towards negative infinity.
pub fn pg_micros_to_unix_millis(pg_micros: i64) -> i64 {
    pg_micros_to_unix_micros(pg_micros).div_euclid(1000)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: start of a transaction.
    Begin(BeginMessage),
    /// `C`: end of a transaction.
    Commit(CommitMessage),
    /// `O`: the transaction was replayed from another origin.
    Origin(OriginMessage),
    /// `R`: the schema of a relation; sent before its first change and again after each change
    /// of its schema.
    Relation(RelationMessage),
    /// `Y`: a non-built-in data type used by a following relation.
    Type(TypeMessage),
    /// `I`: a row inserted.
    Insert(InsertMessage),
    /// `U`: a row updated.
    Update(UpdateMessage),
    /// `D`: a row deleted.
    Delete(DeleteMessage),
    /// `T`: one or more relations truncated.
    Truncate(TruncateMessage),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(LogicalMessage),
}

impl Message {
    /// The one-letter tag of this message on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Commit(_) => b'C',
            Message::Origin(_) => b'O',
            Message::Relation(_) => b'R',
            Message::Type(_) => b'Y',
            Message::Insert(_) => b'I',
            Message::Update(_) => b'U',
            Message::Delete(_) => b'D',
            Message::Truncate(_) => b'T',
            Message::Message(_) => b'M',
        }
    }
}

/// `B`: Begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginMessage {
    /// The final LSN of the transaction.
    pub final_lsn: u64,
    /// Commit timestamp, microseconds since 2000-01-01 UTC (see [`pg_micros_to_unix_millis`]).
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// `C`: Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitMessage {
    /// Flags; currently unused by PostgreSQL (0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: u64,
    /// The end LSN of the transaction: the position to confirm once it is durable downstream.
    pub end_lsn: u64,
    /// Commit timestamp, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// `O`: Origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginMessage {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: u64,
    /// Name of the origin.
    pub name: String,
}

/// Replica identity of a relation (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (if any).
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Parses the `relreplident` byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }

    /// The `relreplident` byte.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Default => b'd',
            Self::Nothing => b'n',
            Self::Full => b'f',
            Self::Index => b'i',
        }
    }
}

/// One column of a [`RelationMessage`] (generated columns are never sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    /// Part of the replica identity (flag bit 1). Under `REPLICA IDENTITY FULL` every column
    /// carries it.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// `R`: Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationMessage {
    /// Relation OID, referenced by the row messages.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Relation name.
    pub name: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Columns, in tuple order.
    pub columns: Vec<ColumnDef>,
}

/// `Y`: Type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// OID of the data type.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// The value of one column in a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value; the value itself is not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Vec<u8>),
    /// `b`: the value in the type's binary format (only with the `binary` option).
    Binary(Vec<u8>),
}

/// Column values of one row, in the order of the relation's columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<TupleValue>);

/// The "before" image carried by Update and Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns are meaningful; the others are null.
    Key(Tuple),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(Tuple),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// `I`: Insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertMessage {
    /// Relation OID (see the preceding [`RelationMessage`]).
    pub relation_id: u32,
    /// The new row.
    pub new: Tuple,
}

/// `U`: Update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateMessage {
    /// Relation OID.
    pub relation_id: u32,
    /// Old key (when the update changed a replica identity column) or old row (`REPLICA
    /// IDENTITY FULL`); absent otherwise.
    pub old: Option<OldTuple>,
    /// The new row; may contain [`TupleValue::UnchangedToast`].
    pub new: Tuple,
}

/// `D`: Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteMessage {
    /// Relation OID.
    pub relation_id: u32,
    /// Old key or, under `REPLICA IDENTITY FULL`, the old row.
    pub old: OldTuple,
}

/// `T`: Truncate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncateMessage {
    /// Option bits: [`TruncateMessage::CASCADE`], [`TruncateMessage::RESTART_IDENTITY`].
    pub options: u8,
    /// OIDs of the truncated relations.
    pub relation_ids: Vec<u32>,
}

impl TruncateMessage {
    /// Option bit: `TRUNCATE … CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit: `TRUNCATE … RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// `CASCADE` was given.
    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    /// `RESTART IDENTITY` was given.
    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// `M`: a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Flags bit 1: emitted as part of a transaction.
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: u64,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content.
    pub content: Vec<u8>,
}

/// Why a pgoutput message could not be decoded. Offsets count from the start of the message
/// (the tag byte is offset 0).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The message has no bytes at all.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag 0x{tag:02x} ({})", printable(*tag))]
    UnknownTag { tag: u8 },
    /// The message ended before a field was complete.
    #[error(
        "{message} message truncated at offset {offset}: {field} needs {needed} byte(s), {available} available"
    )]
    Truncated {
        message: &'static str,
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    /// A C string has no terminating NUL before the end of the message.
    #[error("{message} message: {field} starting at offset {offset} is not NUL-terminated")]
    UnterminatedString {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    /// A name is not valid UTF-8.
    #[error("{message} message: {field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    /// A count or length field is negative.
    #[error("{message} message: {field} at offset {offset} is negative ({value})")]
    NegativeLength {
        message: &'static str,
        field: &'static str,
        offset: usize,
        value: i64,
    },
    /// The replica identity byte is not one of `d`, `n`, `f`, `i`.
    #[error("relation message: unknown replica identity 0x{value:02x} at offset {offset}")]
    UnknownReplicaIdentity { offset: usize, value: u8 },
    /// A tuple column kind is not one of `n`, `u`, `t`, `b`.
    #[error(
        "{message} message: unknown tuple column kind 0x{kind:02x} ({}) at offset {offset}",
        printable(*kind)
    )]
    UnknownColumnKind {
        message: &'static str,
        offset: usize,
        kind: u8,
    },
    /// A tuple marker (`K`, `O`, `N`) is not one allowed at this position.
    #[error(
        "{message} message: expected {expected} at offset {offset}, found 0x{found:02x} ({})",
        printable(*found)
    )]
    UnexpectedTupleMarker {
        message: &'static str,
        offset: usize,
        expected: &'static str,
        found: u8,
    },
    /// Bytes remain after a complete message.
    #[error("{message} message: {remaining} unexpected trailing byte(s) at offset {offset}")]
    TrailingBytes {
        message: &'static str,
        offset: usize,
        remaining: usize,
    },
}

fn printable(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        "non-printable".to_owned()
    }
}

/// Decodes one pgoutput (protocol version 1) message.
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, _) = data.split_first().ok_or(DecodeError::Empty)?;
    let name = match tag {
        b'B' => "begin",
        b'C' => "commit",
        b'O' => "origin",
        b'R' => "relation",
        b'Y' => "type",
        b'I' => "insert",
        b'U' => "update",
        b'D' => "delete",
        b'T' => "truncate",
        b'M' => "logical decoding",
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    let mut r = Reader {
        data,
        pos: 1,
        message: name,
    };
    let msg = match tag {
        b'B' => Message::Begin(BeginMessage {
            final_lsn: r.u64("final LSN")?,
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(CommitMessage {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin(OriginMessage {
            commit_lsn: r.u64("origin commit LSN")?,
            name: r.string("origin name")?,
        }),
        b'R' => Message::Relation(decode_relation(&mut r)?),
        b'Y' => Message::Type(TypeMessage {
            id: r.u32("type OID")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let relation_id = r.u32("relation OID")?;
            r.expect_marker(b"N", "'N'")?;
            Message::Insert(InsertMessage {
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation_id = r.u32("relation OID")?;
            let marker = r.expect_marker(b"KON", "'K', 'O' or 'N'")?;
            let old = match marker {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                _ => None,
            };
            if old.is_some() {
                r.expect_marker(b"N", "'N'")?;
            }
            Message::Update(UpdateMessage {
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation_id = r.u32("relation OID")?;
            let old = match r.expect_marker(b"KO", "'K' or 'O'")? {
                b'K' => OldTuple::Key(r.tuple()?),
                _ => OldTuple::Full(r.tuple()?),
            };
            Message::Delete(DeleteMessage { relation_id, old })
        }
        b'T' => {
            let count = r.count_i32("number of relations")?;
            let options = r.u8("option bits")?;
            let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(r.u32("relation OID")?);
            }
            Message::Truncate(TruncateMessage {
                options,
                relation_ids,
            })
        }
        _ => {
            // b'M'
            let flags = r.u8("flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.string("prefix")?;
            let len = r.count_i32("content length")?;
            let content = r.bytes(len, "content")?.to_vec();
            Message::Message(LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            })
        }
    };
    r.finish()?;
    Ok(msg)
}

fn decode_relation(r: &mut Reader<'_>) -> Result<RelationMessage, DecodeError> {
    let id = r.u32("relation OID")?;
    let namespace = r.string("namespace")?;
    let name = r.string("relation name")?;
    let ri_offset = r.pos;
    let ri = r.u8("replica identity")?;
    let replica_identity =
        ReplicaIdentity::from_byte(ri).ok_or(DecodeError::UnknownReplicaIdentity {
            offset: ri_offset,
            value: ri,
        })?;
    let count = r.count_i16("number of columns")?;
    // Smallest column: flags(1) + name NUL(1) + type(4) + typmod(4).
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        let name = r.string("column name")?;
        let type_oid = r.u32("column type OID")?;
        let type_modifier = r.i32("column type modifier")?;
        columns.push(ColumnDef {
            is_key: flags & 1 != 0,
            name,
            type_oid,
            type_modifier,
        });
    }
    Ok(RelationMessage {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// Bounds-checked big-endian reader over one message.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let available = self.remaining();
        if n > available {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    fn count_i16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let v = self.i16(field)?;
        usize::try_from(v).map_err(|_| self.negative(field, offset, v.into()))
    }

    fn count_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let v = self.i32(field)?;
        usize::try_from(v).map_err(|_| self.negative(field, offset, v.into()))
    }

    fn negative(&self, field: &'static str, offset: usize, value: i64) -> DecodeError {
        DecodeError::NegativeLength {
            message: self.message,
            field,
            offset,
            value,
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = self.data.get(start..).unwrap_or_default();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString {
                message: self.message,
                field,
                offset: start,
            })?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset: start,
        })?;
        self.pos = start + nul + 1;
        Ok(s.to_owned())
    }

    /// Reads one marker byte and checks it is one of `allowed`.
    fn expect_marker(&mut self, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
        let offset = self.pos;
        let b = self.u8("tuple marker")?;
        if allowed.contains(&b) {
            Ok(b)
        } else {
            Err(DecodeError::UnexpectedTupleMarker {
                message: self.message,
                offset,
                expected,
                found: b,
            })
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count_i16("number of tuple columns")?;
        // Smallest column value: one kind byte.
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let offset = self.pos;
            let kind = self.u8("tuple column kind")?;
            let value = match kind {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' | b'b' => {
                    let len = self.count_i32("tuple column length")?;
                    let bytes = self.bytes(len, "tuple column value")?.to_vec();
                    if kind == b't' {
                        TupleValue::Text(bytes)
                    } else {
                        TupleValue::Binary(bytes)
                    }
                }
                _ => {
                    return Err(DecodeError::UnknownColumnKind {
                        message: self.message,
                        offset,
                        kind,
                    });
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            remaining => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.pos,
                remaining,
            }),
        }
    }
}

/// Test-only encoder, the inverse of [`decode`]; shared with the other `cdc` tests.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub(crate) fn tuple(out: &mut Vec<u8>, t: &Tuple) {
        out.extend_from_slice(&(t.0.len() as i16).to_be_bytes());
        for v in &t.0 {
            match v {
                TupleValue::Null => out.push(b'n'),
                TupleValue::UnchangedToast => out.push(b'u'),
                TupleValue::Text(b) | TupleValue::Binary(b) => {
                    out.push(if matches!(v, TupleValue::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    fn old(out: &mut Vec<u8>, o: &OldTuple) {
        match o {
            OldTuple::Key(t) => {
                out.push(b'K');
                tuple(out, t);
            }
            OldTuple::Full(t) => {
                out.push(b'O');
                tuple(out, t);
            }
        }
    }

    pub(crate) fn encode(msg: &Message) -> Vec<u8> {
        let mut out = vec![msg.tag()];
        match msg {
            Message::Begin(m) => {
                out.extend_from_slice(&m.final_lsn.to_be_bytes());
                out.extend_from_slice(&m.commit_time.to_be_bytes());
                out.extend_from_slice(&m.xid.to_be_bytes());
            }
            Message::Commit(m) => {
                out.push(m.flags);
                out.extend_from_slice(&m.commit_lsn.to_be_bytes());
                out.extend_from_slice(&m.end_lsn.to_be_bytes());
                out.extend_from_slice(&m.commit_time.to_be_bytes());
            }
            Message::Origin(m) => {
                out.extend_from_slice(&m.commit_lsn.to_be_bytes());
                string(&mut out, &m.name);
            }
            Message::Relation(m) => {
                out.extend_from_slice(&m.id.to_be_bytes());
                string(&mut out, &m.namespace);
                string(&mut out, &m.name);
                out.push(m.replica_identity.as_byte());
                out.extend_from_slice(&(m.columns.len() as i16).to_be_bytes());
                for c in &m.columns {
                    out.push(u8::from(c.is_key));
                    string(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type(m) => {
                out.extend_from_slice(&m.id.to_be_bytes());
                string(&mut out, &m.namespace);
                string(&mut out, &m.name);
            }
            Message::Insert(m) => {
                out.extend_from_slice(&m.relation_id.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, &m.new);
            }
            Message::Update(m) => {
                out.extend_from_slice(&m.relation_id.to_be_bytes());
                if let Some(o) = &m.old {
                    old(&mut out, o);
                }
                out.push(b'N');
                tuple(&mut out, &m.new);
            }
            Message::Delete(m) => {
                out.extend_from_slice(&m.relation_id.to_be_bytes());
                old(&mut out, &m.old);
            }
            Message::Truncate(m) => {
                out.extend_from_slice(&(m.relation_ids.len() as i32).to_be_bytes());
                out.push(m.options);
                for id in &m.relation_ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            Message::Message(m) => {
                out.push(u8::from(m.transactional));
                out.extend_from_slice(&m.lsn.to_be_bytes());
                string(&mut out, &m.prefix);
                out.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
                out.extend_from_slice(&m.content);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
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
}
