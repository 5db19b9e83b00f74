//! The log of what the sandbox received (`GET /_sandbox/messages`): one entry per request on a
//! platform or sink endpoint, oldest first, in memory only. It keeps the last [`MAX_ENTRIES`]
//! entries and at most [`MAX_BYTES`] of request bodies and ids; older entries are dropped first.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::Channel;

/// The most entries kept.
pub const MAX_ENTRIES: usize = 100_000;

/// The most bytes of bodies and recipient ids kept (about).
pub const MAX_BYTES: usize = 256 * 1024 * 1024;

/// What an entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A token request.
    Token,
    /// A send, push or webhook.
    Message,
}

impl Kind {
    /// Reads a `kind` filter.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "token" => Some(Kind::Token),
            "message" => Some(Kind::Message),
            _ => None,
        }
    }
}

/// A recipient the answer failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failed {
    /// The recipient.
    pub id: String,
    /// The code it failed with.
    pub code: Option<i64>,
}

/// What the sandbox answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// The HTTP status.
    pub http_status: u16,
    /// `errcode` (WeChat, WeCom), `code` (Getui), none for custom.
    pub code: Option<i64>,
}

/// One request received.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// Its place in the log, from 1.
    pub seq: u64,
    /// The channel.
    pub channel: Channel,
    /// Token or message.
    pub kind: Kind,
    /// The touchpoint whose account it was for, when one matched.
    #[serde(serialize_with = "shared_str")]
    pub touchpoint: Option<Arc<str>>,
    /// The path, without the query.
    pub endpoint: String,
    /// The recipients it named.
    pub recipients: Vec<String>,
    /// Those delivered by it (not those a duplicate named again).
    pub delivered: Vec<String>,
    /// Those it failed.
    pub failed: Vec<Failed>,
    /// The platform would not deliver it (or some of its recipients) again.
    pub duplicate: bool,
    /// What was answered.
    pub answer: Answer,
    /// The request's JSON body (null when it had none or it was not JSON).
    pub body: Option<Box<RawValue>>,
}

fn shared_str<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_some(&**t),
        None => s.serialize_none(),
    }
}

/// Entries as a JSON list.
pub struct Listed(pub Vec<Arc<Entry>>);

impl Serialize for Listed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| &**e))
    }
}

impl Entry {
    /// A new entry with nothing delivered or failed yet, answered 200.
    pub fn new(channel: Channel, kind: Kind, endpoint: String, body: &[u8]) -> Self {
        let body = std::str::from_utf8(body)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .and_then(|t| RawValue::from_string(t.to_string()).ok());
        Self {
            seq: 0,
            channel,
            kind,
            touchpoint: None,
            endpoint,
            recipients: Vec::new(),
            delivered: Vec::new(),
            failed: Vec::new(),
            duplicate: false,
            answer: Answer {
                http_status: 200,
                code: None,
            },
            body,
        }
    }

    fn weight(&self) -> usize {
        let ids = |v: &[String]| v.iter().map(|s| s.len() + 24).sum::<usize>();
        256 + self.endpoint.len()
            + self.body.as_ref().map_or(0, |b| b.get().len())
            + ids(&self.recipients)
            + ids(&self.delivered)
            + self.failed.iter().map(|f| f.id.len() + 32).sum::<usize>()
    }
}

/// Which entries to list.
#[derive(Debug, Default)]
pub struct Filter {
    /// Only this channel's.
    pub channel: Option<Channel>,
    /// Only this touchpoint's.
    pub touchpoint: Option<String>,
    /// Only tokens or only messages.
    pub kind: Option<Kind>,
}

/// The bounded log.
#[derive(Debug)]
pub struct Messages {
    entries: VecDeque<(Arc<Entry>, usize)>,
    next_seq: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for Messages {
    fn default() -> Self {
        Self::new(MAX_ENTRIES, MAX_BYTES)
    }
}

impl Messages {
    /// A log keeping at most `max_entries` entries and about `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            next_seq: 1,
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    /// Appends an entry (numbering it), dropping the oldest beyond the bounds.
    pub fn push(&mut self, mut entry: Entry) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let weight = entry.weight();
        self.bytes = self.bytes.saturating_add(weight);
        self.entries.push_back((Arc::new(entry), weight));
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            if let Some((_, w)) = self.entries.pop_front() {
                self.bytes = self.bytes.saturating_sub(w);
            }
        }
    }

    /// The entries the filter lets through, oldest first.
    pub fn list(&self, filter: &Filter) -> Vec<Arc<Entry>> {
        self.entries
            .iter()
            .map(|(e, _)| e)
            .filter(|e| {
                filter.channel.is_none_or(|c| c == e.channel)
                    && filter.kind.is_none_or(|k| k == e.kind)
                    && filter
                        .touchpoint
                        .as_deref()
                        .is_none_or(|t| e.touchpoint.as_deref() == Some(t))
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(channel: Channel, tp: Option<&str>, body: &str) -> Entry {
        let mut e = Entry::new(channel, Kind::Message, "/x".into(), body.as_bytes());
        e.touchpoint = tp.map(Arc::from);
        e
    }

    #[test]
    fn the_log_keeps_the_newest_and_numbers_them() {
        let mut m = Messages::new(2, usize::MAX);
        for tp in ["a", "b", "c"] {
            m.push(entry(Channel::Oa, Some(tp), "{}"));
        }
        let all = m.list(&Filter::default());
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
    }

    #[test]
    fn the_log_is_bounded_in_bytes_too() {
        let big = format!("\"{}\"", "x".repeat(10_000));
        let mut m = Messages::new(100, 25_000);
        for _ in 0..5 {
            m.push(entry(Channel::Custom, None, &big));
        }
        assert_eq!(m.list(&Filter::default()).len(), 2);
    }

    #[test]
    fn filters_select_by_channel_touchpoint_and_kind() {
        let mut m = Messages::default();
        m.push(entry(Channel::Oa, Some("a"), "{}"));
        m.push(entry(Channel::Getui, Some("g"), "not json"));
        m.push(Entry::new(Channel::Oa, Kind::Token, "/t".into(), b""));
        let oa = m.list(&Filter {
            channel: Some(Channel::Oa),
            ..Filter::default()
        });
        assert_eq!(oa.len(), 2);
        let g = m.list(&Filter {
            touchpoint: Some("g".into()),
            ..Filter::default()
        });
        assert_eq!(g.len(), 1);
        assert!(g[0].body.is_none(), "a body that is not JSON is null");
        let tokens = m.list(&Filter {
            kind: Some(Kind::Token),
            ..Filter::default()
        });
        assert_eq!(tokens[0].endpoint, "/t");
    }
}
