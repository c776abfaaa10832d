//! Trust-policy decisions: which anchors may sign which model names, and which names may be
//! accepted unsigned. The control plane decides with it when an artifact is pushed, and the
//! agent decides again, with the policy the control plane sent, before it loads one.

use crate::digest::Sha256Hex;
use crate::signing::{ModelFile, SigningError, TrustAnchor, verify_bundle};

/// One anchor and the model names it may sign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopedAnchor {
    pub anchor: TrustAnchor,
    /// `*` matches any run of characters; everything else is literal.
    pub name_pattern: String,
}

/// The policy a decision is made under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub anchors: Vec<ScopedAnchor>,
    /// Name patterns that may be accepted unsigned (audited development allowances).
    pub unsigned_allowed: Vec<String>,
}

/// Why an artifact was refused by the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyRefusal {
    #[error(
        "model `{name}` is unsigned and no unsigned allowance matches it \
         (sign it, or an admin may `steward trust allow-unsigned PATTERN`)"
    )]
    Unsigned { name: String },
    #[error("no trust anchor may sign models named `{name}`")]
    NoAnchorForName { name: String },
    #[error("the signature does not verify under the trust policy")]
    Signature(#[source] SigningError),
}

/// How an accepted artifact was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acceptance {
    Signed { signer: String },
    UnsignedAllowed { pattern: String },
}

impl Acceptance {
    pub fn signer(&self) -> &str {
        match self {
            Self::Signed { signer } => signer,
            Self::UnsignedAllowed { .. } => "",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Signed { .. } => "verified".to_owned(),
            Self::UnsignedAllowed { pattern } => format!("unsigned-allowed (pattern {pattern})"),
        }
    }
}

impl Policy {
    /// Decides whether `name`, made of `files` (file name, sha256), with an optional
    /// signature bundle, is trusted.
    pub fn evaluate(
        &self,
        name: &str,
        files: &[(String, Sha256Hex)],
        bundle: Option<&[u8]>,
    ) -> Result<Acceptance, PolicyRefusal> {
        let Some(bundle) = bundle.filter(|b| !b.is_empty()) else {
            return self
                .unsigned_allowed
                .iter()
                .find(|pattern| pattern_matches(pattern, name))
                .map(|pattern| Acceptance::UnsignedAllowed {
                    pattern: pattern.clone(),
                })
                .ok_or_else(|| PolicyRefusal::Unsigned {
                    name: name.to_owned(),
                });
        };
        let anchors: Vec<TrustAnchor> = self
            .anchors
            .iter()
            .filter(|a| pattern_matches(&a.name_pattern, name))
            .map(|a| a.anchor.clone())
            .collect();
        if anchors.is_empty() {
            return Err(PolicyRefusal::NoAnchorForName {
                name: name.to_owned(),
            });
        }
        let model_files: Vec<ModelFile<'_>> = files
            .iter()
            .map(|(name, sha256)| ModelFile { name, sha256 })
            .collect();
        let verified =
            verify_bundle(bundle, &model_files, &anchors).map_err(PolicyRefusal::Signature)?;
        Ok(Acceptance::Signed {
            signer: verified.signer,
        })
    }
}

/// Glob match where `*` matches any run of characters (including none); everything else is
/// literal.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_literally_except_for_stars() {
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("gemma-*", "gemma-3-270m"));
        assert!(!pattern_matches("gemma-*", "llama-3"));
        assert!(pattern_matches("*-instruct", "qwen-instruct"));
        assert!(pattern_matches("a*b*c", "a-x-b-y-c"));
        assert!(!pattern_matches("a*b*c", "a-x-c-y-b"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(
            !pattern_matches("ab*ba", "aba"),
            "prefix and suffix must not overlap"
        );
    }

    #[test]
    fn unsigned_models_need_a_matching_allowance() {
        let mut policy = Policy::default();
        let err = policy.evaluate("dev-model", &[], None).unwrap_err();
        assert!(err.to_string().contains("is unsigned"), "{err}");
        policy.unsigned_allowed.push("dev-*".into());
        assert_eq!(
            policy.evaluate("dev-model", &[], None).unwrap(),
            Acceptance::UnsignedAllowed {
                pattern: "dev-*".into()
            }
        );
        assert!(policy.evaluate("prod-model", &[], None).is_err());
    }

    #[test]
    fn a_signed_model_needs_an_anchor_for_its_name() {
        let policy = Policy::default();
        let err = policy.evaluate("m", &[], Some(b"{}")).unwrap_err();
        assert!(matches!(err, PolicyRefusal::NoAnchorForName { .. }));
    }
}
