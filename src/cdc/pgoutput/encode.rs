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
