//! Session tickets sealed with keys that several servers share (read from files, as nginx's
//! `ssl_session_ticket_key`), so that a client resumes on whichever server a balancer sends it
//! to, and across a restart. The first key seals new tickets; every key opens them, so that an
//! operator rotates by putting a new key first and keeping the old one second.
//!
//! A key is 80 bytes (`openssl rand 80`, as for nginx): its first 16 are its name, which every
//! ticket it seals starts with, in the clear, so that the key that opens it is found without
//! trying each; the other 64 are the secret. A ticket is
//!
//! ```text
//! name (16) || salt (16, random) || AES-256-GCM(issued at (8, seconds since 1970) || session) || tag (16)
//! ```
//!
//! sealed with a key of its own, HKDF-SHA256 of the secret and the salt, and a zero nonce (the
//! key seals nothing else). A random 96-bit nonce under the one key would be safe for about 2^32
//! tickets, which a busy fleet seals within a day, and a key file is often never rotated; two
//! tickets under one nonce would let a thief forge tickets, resuming as any client (a client
//! certificate is in the session). A 128-bit salt leaves no such bound. The associated data is
//! the name and a digest of the client CA certificates, so that a server that checks client
//! certificates against other CAs (or none) cannot open the ticket: its client must show its
//! certificate again. The issued-at time makes a ticket older than its lifetime not open,
//! whichever keys are listed; servers that share keys must agree on the time (NTP) to the
//! second or so.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::digest::{self, SHA256};
use ring::hkdf::{self, Prk, Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use rustls::server::ProducesTickets;

/// The length of a key file: as nginx's `ssl_session_ticket_key` takes (`openssl rand 80`).
pub(crate) const TICKET_KEY_LEN: usize = 80;

const NAME_LEN: usize = 16;
const SALT_LEN: usize = 16;
const ISSUED_LEN: usize = 8;

/// The HKDF salt that turns a key file's secret into ours: other software given the same file
/// (nginx uses its bytes as AES and HMAC keys) never uses the same key with another algorithm.
const HKDF_SALT: &[u8] = b"taskserve TLS session ticket key v1";

/// One key: its name, and what each ticket's own key is derived from.
pub(crate) struct TicketKey {
    name: [u8; NAME_LEN],
    secret: Prk,
}

impl TicketKey {
    /// The key whose 80 bytes are `bytes`, as a key file holds them.
    pub(crate) fn new(bytes: &[u8; TICKET_KEY_LEN]) -> Self {
        let (name, secret) = bytes.split_at(NAME_LEN);
        TicketKey {
            name: name.try_into().expect("16 bytes"),
            secret: Salt::new(HKDF_SHA256, HKDF_SALT).extract(secret),
        }
    }

    /// The first 16 bytes of its file, which each ticket it seals starts with.
    pub(crate) fn name(&self) -> [u8; NAME_LEN] {
        self.name
    }

    /// The key of the one ticket whose salt is `salt`.
    fn ticket_key(&self, salt: &[u8]) -> Option<LessSafeKey> {
        let info = [b"ticket ".as_slice(), salt];
        let okm: hkdf::Okm<&aead::Algorithm> = self.secret.expand(&info, &AES_256_GCM).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The name is in every ticket, in the clear; the secret is not shown.
        let name: String = self.name.iter().map(|b| format!("{b:02x}")).collect();
        f.debug_struct("TicketKey")
            .field("name", &name)
            .finish_non_exhaustive()
    }
}

/// Seals tickets with the first of its keys and opens them with any (rustls's
/// [`ProducesTickets`]).
#[derive(Debug)]
pub(crate) struct TicketKeys {
    /// At least one; the first seals.
    keys: Vec<TicketKey>,
    /// Seconds a ticket opens for after it is sealed, and the lifetime clients are told.
    lifetime: u32,
    /// A digest of the client CA certificates, in each ticket's associated data.
    client_roots: [u8; 32],
    random: SystemRandom,
}

impl TicketKeys {
    /// Seals with `keys[0]` and opens with any of `keys` (which must not be empty) tickets that
    /// open for `lifetime` seconds, for a server whose client CA certificates are `client_roots`.
    pub(crate) fn new(
        keys: Vec<TicketKey>,
        lifetime: u32,
        client_roots: &[CertificateDer<'_>],
    ) -> Self {
        assert!(!keys.is_empty(), "no ticket key to seal with");
        let mut digest = digest::Context::new(&SHA256);
        for cert in client_roots {
            // Each certificate's length first, so that no two lists digest alike.
            digest.update(&(cert.len() as u64).to_be_bytes());
            digest.update(cert);
        }
        TicketKeys {
            keys,
            lifetime,
            client_roots: digest.finish().as_ref().try_into().expect("32 bytes"),
            random: SystemRandom::new(),
        }
    }

    fn aad(&self, name: &[u8]) -> [u8; NAME_LEN + 32] {
        let mut aad = [0; NAME_LEN + 32];
        aad[..NAME_LEN].copy_from_slice(name);
        aad[NAME_LEN..].copy_from_slice(&self.client_roots);
        aad
    }

    /// `session` sealed at `now` (seconds since 1970).
    fn seal(&self, session: &[u8], now: u64) -> Option<Vec<u8>> {
        let key = &self.keys[0];
        let mut salt = [0; SALT_LEN];
        self.random.fill(&mut salt).ok()?;
        let sealing = key.ticket_key(&salt)?;
        let header = NAME_LEN + SALT_LEN;
        let mut ticket = Vec::with_capacity(header + ISSUED_LEN + session.len() + 16);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&salt);
        ticket.extend_from_slice(&now.to_be_bytes());
        ticket.extend_from_slice(session);
        // A zero nonce: this ticket's key seals nothing else.
        let nonce = Nonce::assume_unique_for_key([0; 12]);
        let tag = sealing
            .seal_in_place_separate_tag(
                nonce,
                Aad::from(self.aad(&key.name)),
                &mut ticket[header..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    /// The session in `ticket`, if one of the keys sealed it, for this server's client CAs, less
    /// than the lifetime before `now`. `ticket` comes from the client: anything at all.
    fn open(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        let (name, rest) = ticket.split_at_checked(NAME_LEN)?;
        let (salt, sealed) = rest.split_at_checked(SALT_LEN)?;
        // Names are public (they lead every ticket): no need to compare them in constant time.
        let key = self.keys.iter().find(|key| key.name == name)?;
        let opening = key.ticket_key(salt)?;
        let mut opened = sealed.to_vec();
        let nonce = Nonce::assume_unique_for_key([0; 12]);
        let len = opening
            .open_in_place(nonce, Aad::from(self.aad(name)), &mut opened)
            .ok()?
            .len();
        opened.truncate(len);
        let issued = u64::from_be_bytes(opened.get(..ISSUED_LEN)?.try_into().ok()?);
        // A ticket from a server whose clock is ahead looks new: it opens.
        if now.saturating_sub(issued) >= u64::from(self.lifetime) {
            return None;
        }
        opened.drain(..ISSUED_LEN);
        Some(opened)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, session: &[u8]) -> Option<Vec<u8>> {
        self.seal(session, now())
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open(ticket, now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_750_000_000;

    fn key(fill: u8) -> TicketKey {
        TicketKey::new(&[fill; TICKET_KEY_LEN])
    }

    fn sealer(fills: &[u8]) -> TicketKeys {
        TicketKeys::new(fills.iter().map(|&f| key(f)).collect(), 3600, &[])
    }

    #[test]
    fn a_ticket_opens_with_any_listed_key_and_only_those() {
        let ticket = sealer(&[1]).seal(b"session", NOW).unwrap();
        assert_eq!(&ticket[..NAME_LEN], &[1; NAME_LEN]);
        assert_eq!(sealer(&[1]).open(&ticket, NOW).unwrap(), b"session");
        assert_eq!(sealer(&[2, 1]).open(&ticket, NOW).unwrap(), b"session");
        assert_eq!(sealer(&[2]).open(&ticket, NOW), None);
    }

    #[test]
    fn the_same_session_seals_differently_each_time() {
        let keys = sealer(&[1]);
        let (a, b) = (keys.seal(b"session", NOW), keys.seal(b"session", NOW));
        assert_ne!(a, b);
    }

    #[test]
    fn a_ticket_opens_for_its_lifetime_and_not_after() {
        let keys = sealer(&[1]);
        let ticket = keys.seal(b"session", NOW).unwrap();
        assert!(keys.open(&ticket, NOW + 3599).is_some());
        assert!(keys.open(&ticket, NOW + 3600).is_none());
        // Sealed by a server whose clock is ahead.
        assert!(keys.open(&ticket, NOW - 60).is_some());
    }

    #[test]
    fn a_ticket_does_not_open_under_other_client_cas() {
        let ticket = sealer(&[1]).seal(b"session", NOW).unwrap();
        let ca = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        let other = TicketKeys::new(vec![key(1)], 3600, &[ca]);
        assert_eq!(other.open(&ticket, NOW), None);
    }

    #[test]
    fn a_changed_short_or_empty_ticket_does_not_open() {
        let keys = sealer(&[1]);
        let ticket = keys.seal(b"session", NOW).unwrap();
        for at in [0, NAME_LEN, NAME_LEN + SALT_LEN, ticket.len() - 1] {
            let mut changed = ticket.clone();
            changed[at] ^= 1;
            assert_eq!(keys.open(&changed, NOW), None, "byte {at} changed");
        }
        for len in 0..ticket.len() {
            assert_eq!(keys.open(&ticket[..len], NOW), None, "{len} bytes");
        }
    }
}
