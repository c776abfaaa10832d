//! Text formats of the secrets that cross the wire.
//!
//! An enrollment token is `stwe1.<id>.<secret>.<ca-sha256>`: the id names the stored record,
//! the secret is what is stored hashed, and the CA hash lets the agent pin the control plane's
//! CA before it trusts anything it says (like kubeadm's discovery hash). An admin credential is
//! `stwa1.<id>.<secret>`.

use rand::RngCore;
use sha2::Digest;

const ENROLLMENT_PREFIX: &str = "stwe1";
const ADMIN_PREFIX: &str = "stwa1";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("not an enrollment token: expected `stwe1.<id>.<secret>.<ca-sha256>`")]
    NotAnEnrollmentToken,
    #[error("not an admin credential: expected `stwa1.<id>.<secret>`")]
    NotAnAdminCredential,
    #[error("the {0} part is not {1} hex characters")]
    BadPart(&'static str, usize),
}

/// A parsed enrollment token.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub id: String,
    pub secret: String,
    /// Lowercase hex sha256 of the control plane CA certificate (DER).
    pub ca_sha256: String,
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_sha256", &self.ca_sha256)
            .finish()
    }
}

impl EnrollmentToken {
    /// A fresh random token for the CA with the given hash.
    pub fn generate(ca_sha256: &str) -> Self {
        Self {
            id: random_hex(ID_BYTES),
            secret: random_hex(SECRET_BYTES),
            ca_sha256: ca_sha256.to_owned(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let mut parts = text.trim().split('.');
        if parts.next() != Some(ENROLLMENT_PREFIX) {
            return Err(TokenFormatError::NotAnEnrollmentToken);
        }
        let (Some(id), Some(secret), Some(ca), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError::NotAnEnrollmentToken);
        };
        check_hex("id", id, ID_BYTES * 2)?;
        check_hex("secret", secret, SECRET_BYTES * 2)?;
        check_hex("CA hash", ca, 64)?;
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256: ca.to_ascii_lowercase(),
        })
    }

    /// What the agent sends in `EnrollRequest.token`: everything but the CA hash.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// Splits an `EnrollRequest.token` back into id and secret.
    pub fn parse_credential(text: &str) -> Result<(String, String), TokenFormatError> {
        let (id, secret) = text
            .split_once('.')
            .ok_or(TokenFormatError::NotAnEnrollmentToken)?;
        check_hex("id", id, ID_BYTES * 2)?;
        check_hex("secret", secret, SECRET_BYTES * 2)?;
        Ok((id.to_owned(), secret.to_owned()))
    }
}

impl std::fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{ENROLLMENT_PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_sha256
        )
    }
}

/// A parsed admin credential.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminCredential {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for AdminCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminCredential")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl AdminCredential {
    pub fn generate() -> Self {
        Self {
            id: random_hex(ID_BYTES),
            secret: random_hex(SECRET_BYTES),
        }
    }

    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let mut parts = text.trim().split('.');
        if parts.next() != Some(ADMIN_PREFIX) {
            return Err(TokenFormatError::NotAnAdminCredential);
        }
        let (Some(id), Some(secret), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenFormatError::NotAnAdminCredential);
        };
        check_hex("id", id, ID_BYTES * 2)?;
        check_hex("secret", secret, SECRET_BYTES * 2)?;
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl std::fmt::Display for AdminCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{ADMIN_PREFIX}.{}.{}", self.id, self.secret)
    }
}

/// How secrets are stored: hex sha256. The secrets are 256 random bits, so a fast hash is
/// enough; nothing a person chose is ever hashed this way.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn check_hex(part: &'static str, text: &str, len: usize) -> Result<(), TokenFormatError> {
    if text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(TokenFormatError::BadPart(part, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_token_round_trips_through_text() {
        let token = EnrollmentToken::generate(&"ab".repeat(32));
        let parsed = EnrollmentToken::parse(&token.to_string()).unwrap();
        assert_eq!(parsed, token);
        let (id, secret) = EnrollmentToken::parse_credential(&token.credential()).unwrap();
        assert_eq!((id, secret), (token.id, token.secret));
    }

    #[test]
    fn malformed_enrollment_tokens_name_the_bad_part() {
        assert_eq!(
            EnrollmentToken::parse("hello"),
            Err(TokenFormatError::NotAnEnrollmentToken)
        );
        let good = EnrollmentToken::generate(&"cd".repeat(32)).to_string();
        let short_ca = &good[..good.len() - 2];
        assert_eq!(
            EnrollmentToken::parse(short_ca),
            Err(TokenFormatError::BadPart("CA hash", 64))
        );
        let extra = format!("{good}.x");
        assert_eq!(
            EnrollmentToken::parse(&extra),
            Err(TokenFormatError::NotAnEnrollmentToken)
        );
    }

    #[test]
    fn admin_credential_round_trips_and_redacts_its_secret() {
        let cred = AdminCredential::generate();
        assert_eq!(AdminCredential::parse(&cred.to_string()).unwrap(), cred);
        assert!(!format!("{cred:?}").contains(&cred.secret));
        assert!(AdminCredential::parse(&cred.to_string().replace("stwa1", "stwe1")).is_err());
    }
}
