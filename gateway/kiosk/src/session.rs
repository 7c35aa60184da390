//! Server-side sessions: a random token in a cookie, only its SHA-256 kept here.

use std::collections::HashMap;
use std::sync::Mutex;

use gateway_staff::Role;
use sha2::{Digest, Sha256};

/// Cookie name.
pub const COOKIE: &str = "gw_session";
/// A session ends after this long without a request.
pub const IDLE_SECS: u64 = 15 * 60;
/// And after this long in any case.
pub const ABSOLUTE_SECS: u64 = 8 * 60 * 60;

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staffer {
    pub name: String,
    pub role: Role,
}

#[derive(Debug)]
struct Entry {
    who: Staffer,
    created: u64,
    last_seen: u64,
}

/// The live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Entry>>,
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.by_hash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a session; returns the token for the cookie.
    pub fn start(&self, who: Staffer, now: u64) -> Option<String> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).ok()?;
        let token = hex::encode(raw);
        let mut map = self.map();
        map.retain(|_, e| live(e, now));
        map.insert(
            hash(&token),
            Entry {
                who,
                created: now,
                last_seen: now,
            },
        );
        Some(token)
    }

    /// The staff member of a live session, refreshing its idle timer.
    pub fn check(&self, token: &str, now: u64) -> Option<Staffer> {
        let mut map = self.map();
        let key = hash(token);
        let entry = map.get_mut(&key)?;
        if !live(entry, now) {
            map.remove(&key);
            return None;
        }
        entry.last_seen = now;
        Some(entry.who.clone())
    }

    pub fn end(&self, token: &str) {
        self.map().remove(&hash(token));
    }
}

fn live(e: &Entry, now: u64) -> bool {
    now < e.last_seen + IDLE_SECS && now < e.created + ABSOLUTE_SECS
}

/// The session token in a `Cookie` header, if any.
pub fn token_from_cookie(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value for a new session.
pub fn set_cookie(token: &str) -> String {
    format!("{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={ABSOLUTE_SECS}")
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_or_old() {
        let s = Sessions::default();
        let who = Staffer {
            name: "clerk".into(),
            role: Role::Clerk,
        };
        let t = s.start(who.clone(), 1000).unwrap();
        assert_eq!(s.check(&t, 1000 + IDLE_SECS - 1), Some(who.clone()));
        assert_eq!(
            s.check(&t, 1000 + 2 * IDLE_SECS - 2),
            Some(who.clone()),
            "refreshed"
        );
        assert_eq!(s.check(&t, 1000 + 4 * IDLE_SECS), None, "idle");
        let t = s.start(who.clone(), 0).unwrap();
        let mut now = 0;
        while now + 600 < ABSOLUTE_SECS {
            now += 600;
            assert!(s.check(&t, now).is_some());
        }
        assert_eq!(s.check(&t, ABSOLUTE_SECS), None, "absolute limit");
        let t = s.start(who, 0).unwrap();
        s.end(&t);
        assert_eq!(s.check(&t, 1), None);
        assert_eq!(s.check("nonsense", 1), None);
    }

    #[test]
    fn cookie_parsing_takes_only_a_well_formed_token() {
        let t = "ab".repeat(32);
        assert_eq!(
            token_from_cookie(&format!("a=b; {COOKIE}={t}; c=d")),
            Some(t.as_str())
        );
        assert_eq!(token_from_cookie(&format!("{COOKIE}=short")), None);
        assert_eq!(
            token_from_cookie(&format!("{COOKIE}={}", "zz".repeat(32))),
            None
        );
        assert_eq!(token_from_cookie(""), None);
        let c = set_cookie(&t);
        for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(attr), "{c}");
        }
    }
}
