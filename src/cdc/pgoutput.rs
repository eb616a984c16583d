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
pub(crate) mod encode;

#[cfg(test)]
mod tests;
