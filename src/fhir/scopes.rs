//! SMART scopes: parsing (SMART v1 `system/Type.read|write|*` and SMART v2
//! `(patient|user|system)/Type.[c][r][u][d][s]`, SMART App Launch "Scopes and Launch Context"), the
//! grant decision of the token endpoint (SPEC A4.16–21) and the read checks of the bulk endpoints
//! (SPEC A4.19, A9.1).
//!
//! Granting follows three rules: never a write permission (the proxy only exports); never less read
//! than was asked, when the client's registration allows it; and never more than the client's
//! registration allows (a wildcard is narrowed to the types the client may read). Scopes are
//! returned in the syntax they were asked in, so a v1 client gets v1 scopes back.
//!
//! Here, below both `auth` and `config`, because validating a client's registered scopes is part
//! of checking the configuration.

use std::fmt;

use super::resource_types::is_resource_type;

/// Why a scope string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("no scope requested")]
    Empty,
    #[error("`{0}` is not a resource scope (context/Type.permissions)")]
    NotResourceScope(String),
    #[error("`{0}` names an unknown resource type")]
    UnknownResourceType(String),
    #[error(
        "`{0}` has an unknown action: use read, write, * (SMART v1) or c r u d s in that order (SMART v2)"
    )]
    UnknownAction(String),
    #[error("`{0}`: scopes with search parameters are not supported")]
    SearchParameters(String),
    #[error("none of the requested scopes can be granted: {0}")]
    NothingGrantable(String),
}

/// Whom a scope acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    Patient,
    User,
    System,
}

/// The resource types a scope covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    All,
    Type(String),
}

/// Which syntax a scope was written in; a granted scope is returned in the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Syntax {
    V1,
    V2,
}

/// A set of SMART v2 permission letters (`c r u d s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const CREATE: Self = Self(1);
    pub const READ: Self = Self(2);
    pub const UPDATE: Self = Self(4);
    pub const DELETE: Self = Self(8);
    pub const SEARCH: Self = Self(16);
    /// What v1 `read` means: read and search.
    pub const READ_SEARCH: Self = Self(2 | 16);
    /// What v1 `write` means.
    pub const WRITE: Self = Self(1 | 4 | 8);
    pub const ALL: Self = Self(31);
    const LETTERS: [(char, Self); 5] = [
        ('c', Self::CREATE),
        ('r', Self::READ),
        ('u', Self::UPDATE),
        ('d', Self::DELETE),
        ('s', Self::SEARCH),
    ];

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersect(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Letters in the canonical order, e.g. `rs`.
    pub fn letters(self) -> String {
        Self::LETTERS
            .iter()
            .filter(|(_, p)| self.contains(*p))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Parses v2 letters; they must appear in the order `c r u d s`, each at most once.
    fn from_letters(text: &str) -> Option<Self> {
        let mut next = 0;
        let mut bits = 0;
        for ch in text.chars() {
            let offset = Self::LETTERS[next..].iter().position(|(c, _)| *c == ch)?;
            bits |= Self::LETTERS[next + offset].1.0;
            next += offset + 1;
        }
        (bits != 0).then_some(Self(bits))
    }
}

/// One scope, e.g. `system/Patient.read` or `system/*.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub context: Context,
    pub target: Target,
    pub permissions: Permissions,
    pub syntax: Syntax,
}

impl Scope {
    /// Parses one scope token.
    pub fn parse(token: &str) -> Result<Self, ScopeError> {
        let not_resource = || ScopeError::NotResourceScope(token.to_owned());
        let (context, rest) = token.split_once('/').ok_or_else(not_resource)?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return Err(not_resource()),
        };
        if rest.contains('?') {
            return Err(ScopeError::SearchParameters(token.to_owned()));
        }
        let (target, action) = rest.split_once('.').ok_or_else(not_resource)?;
        let target = match target {
            "*" => Target::All,
            name if is_resource_type(name) => Target::Type(name.to_owned()),
            _ => return Err(ScopeError::UnknownResourceType(token.to_owned())),
        };
        let (permissions, syntax) = match action {
            "read" => (Permissions::READ_SEARCH, Syntax::V1),
            "write" => (Permissions::WRITE, Syntax::V1),
            "*" => (Permissions::ALL, Syntax::V1),
            letters => (
                Permissions::from_letters(letters)
                    .ok_or_else(|| ScopeError::UnknownAction(token.to_owned()))?,
                Syntax::V2,
            ),
        };
        Ok(Self {
            context,
            target,
            permissions,
            syntax,
        })
    }

    /// Whether this scope grants `permissions` on `resource_type` in the system context.
    fn allows_system(&self, resource_type: &str, permissions: Permissions) -> bool {
        self.context == Context::System
            && self.permissions.contains(permissions)
            && match &self.target {
                Target::All => true,
                Target::Type(name) => name == resource_type,
            }
    }

    /// Whether everything this scope grants is also granted by `other`.
    fn covered_by(&self, other: &Scope) -> bool {
        self.context == other.context
            && other.permissions.contains(self.permissions)
            && (other.target == Target::All || other.target == self.target)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let context = match self.context {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        };
        let target = match &self.target {
            Target::All => "*",
            Target::Type(name) => name,
        };
        // v1 can only say read, write and *; anything else is written in v2 letters.
        let action = match (self.syntax, self.permissions) {
            (Syntax::V1, Permissions::READ_SEARCH) => "read".to_owned(),
            (Syntax::V1, Permissions::WRITE) => "write".to_owned(),
            (Syntax::V1, Permissions::ALL) => "*".to_owned(),
            (_, permissions) => permissions.letters(),
        };
        write!(f, "{context}/{target}.{action}")
    }
}

/// A set of scopes: a client's registration, or what a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// Parses a space-separated scope string; every token must be a resource scope.
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let scopes = text
            .split_ascii_whitespace()
            .map(Scope::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if scopes.is_empty() {
            return Err(ScopeError::Empty);
        }
        Ok(Self(scopes))
    }

    /// `system/*.read`: what every request gets when authorization is disabled.
    pub fn all_read() -> Self {
        Self(vec![Scope {
            context: Context::System,
            target: Target::All,
            permissions: Permissions::READ_SEARCH,
            syntax: Syntax::V1,
        }])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every scope is in the system context.
    pub fn all_system(&self) -> bool {
        self.0.iter().all(|s| s.context == Context::System)
    }

    /// Whether these scopes allow reading `resource_type` in bulk: a system scope on the type or on
    /// `*` with read permission (v1 `read` or `*`, v2 containing `r`). SPEC A4.19.
    pub fn can_read(&self, resource_type: &str) -> bool {
        self.allow(resource_type, Permissions::READ)
    }

    /// Whether these scopes allow `permissions` on `resource_type` in the system context.
    pub fn allow(&self, resource_type: &str, permissions: Permissions) -> bool {
        self.0
            .iter()
            .any(|s| s.allows_system(resource_type, permissions))
    }

    /// Whether these scopes allow `permissions` on every resource type (`system/*`).
    pub fn allow_all(&self, permissions: Permissions) -> bool {
        self.0.iter().any(|s| {
            s.context == Context::System
                && s.target == Target::All
                && s.permissions.contains(permissions)
        })
    }

    /// Whether these scopes allow reading every resource type (`system/*` with `r`).
    pub fn can_read_all(&self) -> bool {
        self.allow_all(Permissions::READ)
    }

    /// The scopes to grant for a `requested` scope string, within what the client may have
    /// (`allowed`). See the module documentation for the rules.
    ///
    /// A malformed scope (unknown type, unknown action, search parameters) fails the whole request;
    /// scopes that can never be granted here (write-only, non-system, `launch`, `openid`...) are
    /// dropped, and if nothing is left the request fails.
    pub fn grant(requested: &str, allowed: &Scopes) -> Result<Scopes, ScopeError> {
        let mut granted: Vec<Scope> = Vec::new();
        let mut dropped: Vec<String> = Vec::new();
        let mut any = false;
        for token in requested.split_ascii_whitespace() {
            any = true;
            let scope = match Scope::parse(token) {
                Ok(scope) => scope,
                Err(ScopeError::NotResourceScope(_)) => {
                    dropped.push(format!("`{token}` is not a system resource scope"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if scope.context != Context::System {
                dropped.push(format!(
                    "`{token}`: backend services get system/ scopes only"
                ));
                continue;
            }
            let readable = scope.permissions.intersect(Permissions::READ_SEARCH);
            if readable.is_empty() {
                dropped.push(format!("`{token}`: write access is never granted"));
                continue;
            }
            let before = granted.len();
            for limit in allowed.0.iter().filter(|a| a.context == Context::System) {
                let target = match (&scope.target, &limit.target) {
                    (Target::All, narrowed) => narrowed.clone(),
                    (asked, Target::All) => asked.clone(),
                    (asked, own) if asked == own => asked.clone(),
                    _ => continue,
                };
                let permissions = readable.intersect(limit.permissions);
                if !permissions.is_empty() {
                    // v1 can say only read, write and *: anything narrower is v2.
                    let v1 = matches!(
                        permissions,
                        Permissions::READ_SEARCH | Permissions::WRITE | Permissions::ALL
                    );
                    granted.push(Scope {
                        context: Context::System,
                        target,
                        permissions,
                        syntax: if v1 { scope.syntax } else { Syntax::V2 },
                    });
                }
            }
            if granted.len() == before {
                dropped.push(format!("`{token}` is not registered for this client"));
            }
        }
        if !any {
            return Err(ScopeError::Empty);
        }
        let granted = simplify(granted);
        if granted.is_empty() {
            return Err(ScopeError::NothingGrantable(dropped.join("; ")));
        }
        Ok(Self(granted))
    }
}

/// Drops scopes that another scope in the set already covers, keeping the first-seen order.
fn simplify(scopes: Vec<Scope>) -> Vec<Scope> {
    let mut kept: Vec<Scope> = Vec::with_capacity(scopes.len());
    for (i, scope) in scopes.iter().enumerate() {
        let redundant = scopes.iter().enumerate().any(|(j, other)| {
            j != i && scope.covered_by(other) && (!other.covered_by(scope) || j < i)
        });
        if !redundant {
            kept.push(scope.clone());
        }
    }
    kept
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{scope}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn allowed(text: &str) -> Scopes {
        Scopes::parse(text).unwrap()
    }

    fn grant(requested: &str, registered: &str) -> Result<String, ScopeError> {
        Scopes::grant(requested, &allowed(registered)).map(|s| s.to_string())
    }

    #[test]
    fn v1_and_v2_scopes_parse_and_print_back_unchanged() {
        for text in [
            "system/*.read",
            "system/Patient.write",
            "system/Observation.*",
            "system/*.rs",
            "system/Patient.cruds",
            "patient/Observation.r",
            "user/Encounter.cu",
        ] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn malformed_scopes_are_told_apart() {
        assert!(matches!(
            Scope::parse("launch"),
            Err(ScopeError::NotResourceScope(_))
        ));
        assert!(matches!(
            Scope::parse("system/UnknownResource.read"),
            Err(ScopeError::UnknownResourceType(_))
        ));
        for bad in [
            "system/Patient.unknownAction",
            "system/Patient.xyz",
            "system/Patient.dus",
            "system/Patient.rr",
            "system/Patient.",
        ] {
            assert!(
                matches!(Scope::parse(bad), Err(ScopeError::UnknownAction(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Scope::parse("system/Patient.rs?a=b"),
            Err(ScopeError::SearchParameters(_))
        ));
    }

    #[test]
    fn read_requests_within_the_registration_are_granted_in_their_own_syntax() {
        let all = "system/*.read";
        assert_eq!(grant("system/*.read", all).unwrap(), "system/*.read");
        assert_eq!(grant("system/*.rs", all).unwrap(), "system/*.rs");
        assert_eq!(
            grant("system/Patient.read", all).unwrap(),
            "system/Patient.read"
        );
        assert_eq!(
            grant("system/Patient.rs", all).unwrap(),
            "system/Patient.rs"
        );
        assert_eq!(
            grant("system/Patient.read system/Observation.rs", all).unwrap(),
            "system/Patient.read system/Observation.rs"
        );
    }

    #[test]
    fn wildcard_actions_are_granted_as_their_read_part() {
        let all = "system/*.read";
        assert_eq!(grant("system/*.*", all).unwrap(), "system/*.read");
        assert_eq!(
            grant("system/Patient.*", all).unwrap(),
            "system/Patient.read"
        );
        assert_eq!(grant("system/*.cruds", all).unwrap(), "system/*.rs");
        assert_eq!(
            grant("system/Patient.cruds", all).unwrap(),
            "system/Patient.rs"
        );
    }

    #[test]
    fn write_scopes_alone_are_refused() {
        for write in [
            "system/Patient.write",
            "system/Patient.c",
            "system/Patient.cu",
            "system/Patient.cd",
            "system/Patient.cud",
            "system/Patient.ud",
            "system/Patient.d",
            "system/Patient.u",
        ] {
            assert!(
                matches!(
                    grant(write, "system/*.*"),
                    Err(ScopeError::NothingGrantable(_))
                ),
                "{write}"
            );
        }
    }

    #[test]
    fn non_system_and_empty_requests_are_refused() {
        assert_eq!(grant("", "system/*.read"), Err(ScopeError::Empty));
        assert_eq!(grant("   ", "system/*.read"), Err(ScopeError::Empty));
        assert!(matches!(
            grant("launch fhirUser", "system/*.read"),
            Err(ScopeError::NothingGrantable(_))
        ));
        assert!(matches!(
            grant("patient/*.read", "system/*.read"),
            Err(ScopeError::NothingGrantable(_))
        ));
        assert_eq!(
            grant("system/*.read openid", "system/*.read").unwrap(),
            "system/*.read",
            "a grantable scope survives unrelated ones"
        );
    }

    #[test]
    fn wildcards_are_narrowed_to_the_registration() {
        let registered = "system/Patient.read system/Observation.rs";
        assert_eq!(
            grant("system/*.read", registered).unwrap(),
            "system/Patient.read system/Observation.read"
        );
        assert!(matches!(
            grant("system/Group.read", registered),
            Err(ScopeError::NothingGrantable(_))
        ));
        assert_eq!(
            grant("system/Patient.rs system/Group.rs", registered).unwrap(),
            "system/Patient.rs"
        );
    }

    #[test]
    fn redundant_grants_are_folded() {
        assert_eq!(
            grant(
                "system/*.read system/Patient.read system/*.read",
                "system/*.read"
            )
            .unwrap(),
            "system/*.read"
        );
    }

    #[test]
    fn can_read_needs_a_system_scope_with_r() {
        let scopes = allowed("system/Observation.read system/Patient.s patient/Encounter.read");
        assert!(scopes.can_read("Observation"));
        assert!(!scopes.can_read("Patient"), "s alone is not read");
        assert!(!scopes.can_read("Encounter"), "patient context is not bulk");
        assert!(!scopes.can_read_all());
        assert!(allowed("system/*.r").can_read("Condition"));
        assert!(allowed("system/*.r").can_read_all());
        assert!(!allowed("system/*.write").can_read("Condition"));
    }

    fn arb_scope() -> impl Strategy<Value = String> {
        let context = prop_oneof![
            Just("system"),
            Just("patient"),
            Just("user"),
            Just("launch")
        ];
        let target = prop_oneof![
            Just("*"),
            Just("Patient"),
            Just("Observation"),
            Just("Group"),
            Just("Bogus")
        ];
        let action = prop_oneof![
            Just("read".to_owned()),
            Just("write".to_owned()),
            Just("*".to_owned()),
            "[cruds]{1,5}",
        ];
        (context, target, action).prop_map(|(c, t, a)| format!("{c}/{t}.{a}"))
    }

    fn arb_registration() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("system/*.read"),
            Just("system/*.rs"),
            Just("system/*.*"),
            Just("system/Patient.read"),
            Just("system/Patient.r system/Observation.read"),
            Just("system/Observation.s"),
        ]
        .prop_map(str::to_owned)
    }

    proptest! {
        #[test]
        fn a_grant_never_writes_and_never_exceeds_the_registration(
            requested in proptest::collection::vec(arb_scope(), 0..5),
            registration in arb_registration(),
        ) {
            let registered = allowed(&registration);
            if let Ok(granted) = Scopes::grant(&requested.join(" "), &registered) {
                for scope in granted.iter() {
                    prop_assert!(Permissions::READ_SEARCH.contains(scope.permissions), "{scope}");
                    prop_assert_eq!(scope.context, Context::System);
                    prop_assert!(registered.iter().any(|r| scope.covered_by(r)), "{scope} beyond {registration}");
                }
                // What is granted can be parsed back (it travels inside the access token).
                prop_assert_eq!(Scopes::parse(&granted.to_string()).unwrap(), granted);
            }
        }

        #[test]
        fn a_full_read_registration_grants_every_read_asked_for(
            requested in proptest::collection::vec(arb_scope(), 1..5),
        ) {
            let registered = allowed("system/*.rs");
            let text = requested.join(" ");
            match Scopes::grant(&text, &registered) {
                Ok(granted) => {
                    for token in &requested {
                        if let Ok(asked) = Scope::parse(token) {
                            if asked.context != Context::System {
                                continue;
                            }
                            let wanted = Scope {
                                permissions: asked.permissions.intersect(Permissions::READ_SEARCH),
                                ..asked
                            };
                            prop_assert!(
                                wanted.permissions.is_empty()
                                    || granted.iter().any(|g| wanted.covered_by(g)),
                                "{token} not covered by {granted}"
                            );
                        }
                    }
                }
                Err(_) => {
                    // Refused only when something was malformed or nothing readable was asked.
                    let readable = requested.iter().filter_map(|t| Scope::parse(t).ok()).any(|s| {
                        s.context == Context::System
                            && !s.permissions.intersect(Permissions::READ_SEARCH).is_empty()
                    });
                    let malformed = requested.iter().any(|t| {
                        matches!(Scope::parse(t), Err(e) if !matches!(e, ScopeError::NotResourceScope(_)))
                    });
                    prop_assert!(malformed || !readable, "{text} refused");
                }
            }
        }
    }
}
