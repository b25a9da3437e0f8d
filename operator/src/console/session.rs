//! Who may use the console: sign-in tokens an administrator issues with
//! `hapair-operator console-token create`, the session cookie a sign-in sets, and the CSRF
//! token that every state-changing request must carry.
//!
//! Tokens and sessions are signed, not stored: an HMAC-SHA256 over their claims, keyed from
//! the controller CA's private key. Every controller that holds the CA (one standalone
//! controller, or all those sharing etcd) checks them alike, and a controller restart keeps
//! people signed in. The price is that a token cannot be revoked one by one before it
//! expires; lifetimes are therefore bounded ([`MAX_TOKEN_TTL`]) and a session never outlives
//! its token. Pure: time and randomness are inputs.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::support::timestamp::{UnixMillis, format_millis};

/// Prefix that makes a console token recognisable in logs and shell history.
pub const TOKEN_PREFIX: &str = "hpc_";
/// Longest token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Longest session: a sign-in lasts a working day, or less if the token ends sooner.
pub const MAX_SESSION: Duration = Duration::from_secs(12 * 3600);
/// The session cookie. `__Host-` makes browsers insist on Secure, `Path=/` and no Domain,
/// so no other host or path can plant or read it.
pub const COOKIE_NAME: &str = "__Host-hapair-session";
/// The header state-changing requests carry the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

type HmacSha256 = Hmac<Sha256>;

/// What a console user may do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleRole {
    /// Sees everything, acts on nothing.
    Viewer,
    /// Also runs admin actions (switchover, maintenance, force-active, resolve split brain).
    Operator,
}

impl ConsoleRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConsoleRole::Viewer => "viewer",
            ConsoleRole::Operator => "operator",
        }
    }
}

impl std::str::FromStr for ConsoleRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(ConsoleRole::Viewer),
            "operator" => Ok(ConsoleRole::Operator),
            other => Err(format!("role {other:?}: expected viewer or operator")),
        }
    }
}

/// What a token says. Its `id` names it in audit events; the token itself is never logged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub id: String,
    pub role: ConsoleRole,
    /// Who it was issued to, as given to `console-token create --name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub iat: UnixMillis,
    pub exp: UnixMillis,
}

impl TokenClaims {
    /// How audit events name whoever holds this token.
    pub fn actor(&self) -> String {
        match &self.name {
            Some(name) => format!("console user {name:?} ({}, token {})", self.role.as_str(), self.id),
            None => format!("console token {} ({})", self.id, self.role.as_str()),
        }
    }
}

/// A signed-in browser.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Random per sign-in; the CSRF token is derived from it.
    pub sid: String,
    pub token: TokenClaims,
    pub exp: UnixMillis,
}

/// Why a token, session or CSRF token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("not a hapair console token (console tokens start with {TOKEN_PREFIX})")]
    NotAToken,
    #[error("the token is damaged or was not issued by this controller")]
    BadSignature,
    #[error("the token expired at {0}")]
    TokenExpired(String),
    #[error("not signed in")]
    NoSession,
    #[error("the session expired at {0}; sign in again")]
    SessionExpired(String),
    #[error("the session cookie is damaged or was not issued by this controller; sign in again")]
    BadSession,
    #[error("ttl must be between 1s and {}h", MAX_TOKEN_TTL.as_secs() / 3600)]
    InvalidTtl,
    #[error("name {0:?}: use at most 63 printable characters")]
    InvalidName(String),
}

/// The keys tokens and sessions are signed with: separate keys for separate purposes, so a
/// session cookie can never pass for a token or the other way round.
#[derive(Clone)]
pub struct ConsoleKeys {
    token: [u8; 32],
    session: [u8; 32],
}

impl fmt::Debug for ConsoleKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConsoleKeys(<redacted>)")
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key"));
    for part in parts {
        mac.update(part);
    }
    mac
}

fn derive(secret: &[u8], label: &str) -> [u8; 32] {
    mac(secret, &[label.as_bytes()]).finalize().into_bytes().into()
}

fn random_id(rng: &mut dyn RngCore, prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rng.fill_bytes(&mut buf);
    format!("{prefix}{}", crate::support::hex::encode(&buf))
}

impl ConsoleKeys {
    /// The keys of every controller that holds `ca`.
    pub fn from_ca(ca: &crate::pki::Ca) -> ConsoleKeys {
        ConsoleKeys::derive(ca.private_key_der())
    }

    /// Keys derived from `secret`.
    pub fn derive(secret: &[u8]) -> ConsoleKeys {
        ConsoleKeys {
            token: derive(secret, "hapair console token v1"),
            session: derive(secret, "hapair console session v1"),
        }
    }

    /// Issues a token; returns its text (shown once) and its claims.
    pub fn issue_token(
        &self,
        role: ConsoleRole,
        name: Option<&str>,
        ttl: Duration,
        now: UnixMillis,
        rng: &mut dyn RngCore,
    ) -> Result<(String, TokenClaims), AuthError> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(AuthError::InvalidTtl);
        }
        if let Some(name) = name
            && (name.is_empty() || name.chars().count() > 63 || name.chars().any(char::is_control))
        {
            return Err(AuthError::InvalidName(name.to_string()));
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let claims = TokenClaims {
            id: random_id(rng, "c-", 4),
            role,
            name: name.map(str::to_string),
            iat: now,
            exp: now.saturating_add(ttl_ms),
        };
        let text = format!("{TOKEN_PREFIX}{}", seal(&self.token, &claims));
        Ok((text, claims))
    }

    /// The claims of a token this controller issued and that has not expired.
    pub fn check_token(&self, text: &str, now: UnixMillis) -> Result<TokenClaims, AuthError> {
        let sealed = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(AuthError::NotAToken)?;
        let claims: TokenClaims = open(&self.token, sealed).ok_or(AuthError::BadSignature)?;
        if now >= claims.exp {
            return Err(AuthError::TokenExpired(format_millis(claims.exp)));
        }
        Ok(claims)
    }

    /// Signs in with a checked token: the cookie value and the session it holds.
    pub fn open_session(&self, token: TokenClaims, now: UnixMillis, rng: &mut dyn RngCore) -> (String, Session) {
        let longest = now.saturating_add(i64::try_from(MAX_SESSION.as_millis()).unwrap_or(i64::MAX));
        let session = Session { sid: random_id(rng, "", 16), exp: token.exp.min(longest), token };
        (seal(&self.session, &session), session)
    }

    /// The session a cookie value holds, if this controller signed it and it has not ended.
    pub fn check_session(&self, cookie: Option<&str>, now: UnixMillis) -> Result<Session, AuthError> {
        let cookie = cookie.ok_or(AuthError::NoSession)?;
        let session: Session = open(&self.session, cookie).ok_or(AuthError::BadSession)?;
        if now >= session.exp {
            return Err(AuthError::SessionExpired(format_millis(session.exp)));
        }
        Ok(session)
    }

    /// The CSRF token of a session: the page reads it from `GET /ui/api/session` and sends
    /// it back in [`CSRF_HEADER`]. Another site can neither read it nor set the header.
    pub fn csrf(&self, session: &Session) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.session, &[b"csrf:", session.sid.as_bytes()]).finalize().into_bytes())
    }

    /// Whether `presented` is the session's CSRF token, compared in constant time.
    pub fn check_csrf(&self, session: &Session, presented: Option<&str>) -> bool {
        let Some(bytes) = presented.and_then(|p| URL_SAFE_NO_PAD.decode(p.trim()).ok()) else {
            return false;
        };
        mac(&self.session, &[b"csrf:", session.sid.as_bytes()]).verify_slice(&bytes).is_ok()
    }
}

/// `base64(json).base64(hmac)`.
fn seal<T: Serialize>(key: &[u8], claims: &T) -> String {
    // Serializing these plain structs cannot fail.
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let tag = URL_SAFE_NO_PAD.encode(mac(key, &[body.as_bytes()]).finalize().into_bytes());
    format!("{body}.{tag}")
}

fn open<T: for<'de> Deserialize<'de>>(key: &[u8], sealed: &str) -> Option<T> {
    let (body, tag) = sealed.split_once('.')?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    mac(key, &[body.as_bytes()]).verify_slice(&tag).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn keys() -> ConsoleKeys {
        ConsoleKeys::derive(b"a CA key")
    }

    #[test]
    fn a_token_signs_in_until_it_expires() {
        let mut rng = StdRng::seed_from_u64(1);
        let (text, claims) = keys().issue_token(ConsoleRole::Viewer, Some("alice"), HOUR, 1_000, &mut rng).unwrap();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert_eq!(keys().check_token(&text, 1_000 + 3_599_999).unwrap(), claims);
        assert_eq!(
            keys().check_token(&text, 1_000 + 3_600_000),
            Err(AuthError::TokenExpired(format_millis(3_601_000)))
        );
        assert_eq!(claims.actor(), format!("console user \"alice\" (viewer, token {})", claims.id));
    }

    #[test]
    fn a_token_from_another_controller_or_edited_is_refused() {
        let mut rng = StdRng::seed_from_u64(2);
        let (text, _) = keys().issue_token(ConsoleRole::Viewer, None, HOUR, 0, &mut rng).unwrap();
        assert_eq!(ConsoleKeys::derive(b"another CA").check_token(&text, 1), Err(AuthError::BadSignature));
        // Raise the role in the claims, keep the signature.
        let (body, tag) = text.strip_prefix(TOKEN_PREFIX).unwrap().split_once('.').unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap().replace("viewer", "operator");
        let forged = format!("{TOKEN_PREFIX}{}.{tag}", URL_SAFE_NO_PAD.encode(json));
        assert_eq!(keys().check_token(&forged, 1), Err(AuthError::BadSignature));
        assert_eq!(keys().check_token("hpe_enrollment", 1), Err(AuthError::NotAToken));
        assert_eq!(keys().check_token("hpc_", 1), Err(AuthError::BadSignature));
    }

    #[test]
    fn a_session_cookie_is_not_a_token_and_never_outlives_it() {
        let mut rng = StdRng::seed_from_u64(3);
        let (text, claims) = keys().issue_token(ConsoleRole::Operator, None, HOUR, 0, &mut rng).unwrap();
        let (cookie, session) = keys().open_session(claims.clone(), 10, &mut rng);
        assert_eq!(session.exp, claims.exp, "a one-hour token gives a one-hour session");
        assert_eq!(keys().check_session(Some(&cookie), 20).unwrap(), session);
        assert_eq!(
            keys().check_session(Some(&cookie), claims.exp),
            Err(AuthError::SessionExpired(format_millis(claims.exp)))
        );
        assert_eq!(keys().check_token(&format!("{TOKEN_PREFIX}{cookie}"), 20), Err(AuthError::BadSignature));
        assert_eq!(keys().check_session(text.strip_prefix(TOKEN_PREFIX), 20), Err(AuthError::BadSession));
        assert_eq!(keys().check_session(None, 20), Err(AuthError::NoSession));

        let (_, long) = keys().issue_token(ConsoleRole::Viewer, None, MAX_TOKEN_TTL, 0, &mut rng).unwrap();
        let (_, session) = keys().open_session(long, 0, &mut rng);
        assert_eq!(session.exp, 12 * 3_600_000, "a session lasts at most a working day");
    }

    #[test]
    fn the_csrf_token_belongs_to_one_session() {
        let mut rng = StdRng::seed_from_u64(4);
        let (_, claims) = keys().issue_token(ConsoleRole::Operator, None, HOUR, 0, &mut rng).unwrap();
        let (_, one) = keys().open_session(claims.clone(), 0, &mut rng);
        let (_, two) = keys().open_session(claims, 0, &mut rng);
        let csrf = keys().csrf(&one);
        assert!(keys().check_csrf(&one, Some(&csrf)));
        assert!(!keys().check_csrf(&two, Some(&csrf)));
        assert!(!keys().check_csrf(&one, None));
        assert!(!keys().check_csrf(&one, Some("")));
        assert!(!keys().check_csrf(&one, Some("not base64!")));
    }

    #[test]
    fn lifetimes_and_names_are_bounded() {
        let mut rng = StdRng::seed_from_u64(5);
        let k = keys();
        assert_eq!(k.issue_token(ConsoleRole::Viewer, None, Duration::ZERO, 0, &mut rng), Err(AuthError::InvalidTtl));
        assert_eq!(
            k.issue_token(ConsoleRole::Viewer, None, MAX_TOKEN_TTL + Duration::from_secs(1), 0, &mut rng),
            Err(AuthError::InvalidTtl)
        );
        assert_eq!(
            k.issue_token(ConsoleRole::Viewer, Some("a\nb"), HOUR, 0, &mut rng),
            Err(AuthError::InvalidName("a\nb".into()))
        );
        assert_eq!("admin".parse::<ConsoleRole>(), Err("role \"admin\": expected viewer or operator".into()));
    }
}
