use std::fmt;

/// A configuration problem, always naming the key (dotted path) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `database.port`; empty for problems with the file itself.
    pub key: String,
    /// What is wrong, in words an operator can act on. Never contains a secret value.
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "invalid configuration: {}", self.problem)
        } else {
            write!(f, "invalid configuration: `{}`: {}", self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Turns figment's extraction error into our key + problem form, naming where the bad value
/// came from (file or environment variable).
pub(super) fn from_figment(err: figment::Error, env_prefix: &str) -> ConfigError {
    use figment::error::Kind;
    let mut path: Vec<String> = err.path.clone();
    let problem = match &err.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let known = if expected.is_empty() {
                String::from("this section takes no keys")
            } else {
                format!("known keys here: {}", expected.join(", "))
            };
            format!("unknown key ({known})")
        }
        Kind::MissingField(field) => {
            if path.last().map(String::as_str) != Some(field.as_ref()) {
                path.push(field.to_string());
            }
            "required key is missing".to_string()
        }
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::InvalidValue(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value `{found}` (expected one of: {})",
                expected.join(", ")
            )
        }
        Kind::InvalidLength(len, expected) => format!("expected {expected}, found length {len}"),
        Kind::DuplicateField(field) => format!("key `{field}` given twice"),
        Kind::Message(msg) => msg.clone(),
        other => other.to_string(),
    };
    let key = path.join(".");
    let origin = match err.metadata.as_ref().and_then(|m| m.source.as_ref()) {
        Some(figment::Source::File(file)) => format!(" (in {})", file.display()),
        _ if err
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment")) =>
        {
            let var = format!("{env_prefix}{}", key.to_uppercase().replace('.', "__"));
            format!(" (from environment variable {var})")
        }
        _ => String::new(),
    };
    ConfigError::new(key, format!("{problem}{origin}"))
}
