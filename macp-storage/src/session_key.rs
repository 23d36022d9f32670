//! Session ids as in-memory maps key them: a canonical UUID (lowercase,
//! hyphenated: what the SDKs generate) as its 16 bytes, anything else as
//! text.
//!
//! Both stores keep one map entry per open session, so a 36-byte id in an
//! allocation of its own was a large share of each entry (issue 15:
//! 100,000 open sessions in 100 MiB). A [`KeyRef`] looks a `&str` id up in
//! a `hashbrown` map of [`SessionKey`]s without building a key (hashbrown's
//! `Equivalent`).

use std::fmt;
use std::hash::{Hash, Hasher};

use hashbrown::Equivalent;
use macp_wire::uuid_text;

/// An owned session id, compact for canonical UUIDs. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionKey {
    /// A canonical UUID's 16 bytes.
    Uuid([u8; 16]),
    /// Any other id, verbatim.
    Text(Box<str>),
}

/// A borrowed [`SessionKey`], for lookups that allocate nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRef<'a> {
    /// A canonical UUID's 16 bytes.
    Uuid([u8; 16]),
    /// Any other id, verbatim.
    Text(&'a str),
}

impl<'a> KeyRef<'a> {
    /// The key of `id`.
    pub fn of(id: &'a str) -> KeyRef<'a> {
        match uuid_text::parse(id) {
            Some(b) => KeyRef::Uuid(b),
            None => KeyRef::Text(id),
        }
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match self {
            KeyRef::Uuid(b) => {
                0u8.hash(h);
                b.hash(h);
            }
            KeyRef::Text(t) => {
                1u8.hash(h);
                t.hash(h);
            }
        }
    }
}

impl SessionKey {
    /// The key of `id`.
    pub fn new(id: &str) -> SessionKey {
        match KeyRef::of(id) {
            KeyRef::Uuid(b) => SessionKey::Uuid(b),
            KeyRef::Text(t) => SessionKey::Text(t.into()),
        }
    }

    /// The borrowed form, which hashes and compares the same.
    pub fn key_ref(&self) -> KeyRef<'_> {
        match self {
            SessionKey::Uuid(b) => KeyRef::Uuid(*b),
            SessionKey::Text(t) => KeyRef::Text(t),
        }
    }

    /// The id as the session has it.
    pub fn text(&self) -> Box<str> {
        match self {
            SessionKey::Uuid(b) => uuid_text::format(b).into(),
            SessionKey::Text(t) => t.clone(),
        }
    }
}

/// Writes the id as the session has it.
impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionKey::Uuid(b) => f.write_str(&uuid_text::format(b)),
            SessionKey::Text(t) => f.write_str(t),
        }
    }
}

impl Hash for SessionKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key_ref().hash(h)
    }
}

impl Equivalent<SessionKey> for KeyRef<'_> {
    fn equivalent(&self, key: &SessionKey) -> bool {
        *self == key.key_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any 16 bytes written canonically read back as the same bytes and
        /// text; the uppercase spelling is a different id, kept as text.
        #[test]
        fn uuid_keys_round_trip(b in any::<[u8; 16]>()) {
            let id = uuid_text::format(&b);
            prop_assert_eq!(uuid_text::parse(&id), Some(b));
            prop_assert_eq!(&*SessionKey::new(&id).text(), id.as_str());
            prop_assert_eq!(SessionKey::new(&id).to_string(), id.clone());
            let upper = id.to_uppercase();
            if upper != id {
                prop_assert_eq!(KeyRef::of(&upper), KeyRef::Text(&upper));
                prop_assert_eq!(SessionKey::new(&upper).to_string(), upper.clone());
            }
        }
    }
}
