//! Reading a TOML file and reporting its problems at a file, line and column.
//!
//! Loading is two-staged: serde parses the text into a raw shape that keeps the
//! byte span of every value (`toml::Spanned`) and rejects unknown keys; the
//! validation that follows turns raw values into typed ones and records every
//! problem it finds, each located in the file, before failing once with all of
//! them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;

/// A configuration file's text, kept so that byte spans can be turned into
/// line and column numbers.
#[derive(Debug, Clone)]
pub struct Source {
    path: PathBuf,
    text: String,
}

/// One problem in a configuration file, located at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The located problems, empty when the file could not be read at all.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(problems) => problems,
        }
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl Source {
    /// Reads the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::new(path, text))
    }

    /// A source whose text is already in memory; `path` is only used in messages.
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Parses the text into the raw serde shape `T`, locating a syntax error,
    /// an unknown key or a value of the wrong type.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|err| {
            let span = err.span().unwrap_or(0..0);
            ConfigError::Invalid(vec![self.problem(span, err.message().trim_end())])
        })
    }

    /// A problem located at the start of `span`.
    pub fn problem(&self, span: Range<usize>, message: impl fmt::Display) -> Problem {
        let (line, column) = self.position(span.start);
        Problem {
            path: self.path.clone(),
            line,
            column,
            message: message.to_string(),
        }
    }

    /// The 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }
}

/// Collects the problems found while validating one source, so that a file
/// with several mistakes reports all of them at once.
#[derive(Debug)]
pub struct Validator<'a> {
    source: &'a Source,
    problems: Vec<Problem>,
}

impl<'a> Validator<'a> {
    pub fn new(source: &'a Source) -> Self {
        Self {
            source,
            problems: Vec::new(),
        }
    }

    /// Validates an optional field: `default` when absent, `check`'s value
    /// when it accepts the raw one. A rejected value is recorded as a problem
    /// at the value's position, and validation goes on with the default.
    pub fn field<T, U>(
        &mut self,
        raw: Option<Spanned<T>>,
        default: U,
        check: impl FnOnce(T) -> Result<U, String>,
    ) -> U {
        match raw {
            None => default,
            Some(raw) => {
                let span = raw.span();
                match check(raw.into_inner()) {
                    Ok(value) => value,
                    Err(message) => {
                        self.report(span, message);
                        default
                    }
                }
            }
        }
    }

    /// Records a problem at `span`.
    pub fn report(&mut self, span: Range<usize>, message: impl fmt::Display) {
        self.problems.push(self.source.problem(span, message));
    }

    /// The validated value, or every problem found on the way to it, in
    /// the order of the file.
    pub fn finish<T>(mut self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            self.problems.sort_by_key(|p| (p.line, p.column));
            Err(ConfigError::Invalid(self.problems))
        }
    }
}

/// Parses a socket address such as `127.0.0.1:8080`.
pub fn socket_addr(text: String) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not a socket address such as 127.0.0.1:8080"))
}

/// Parses a positive duration such as `500ms`, `2s` or `1m 30s`.
pub fn duration(text: String) -> Result<std::time::Duration, String> {
    match duration_or_zero(text.clone())? {
        d if d.is_zero() => Err(format!("duration `{text}` must be greater than zero")),
        d => Ok(d),
    }
}

/// The longest duration any setting takes: a year. Every timer, deadline
/// and count of milliseconds made from a setting stays far from overflow.
pub const LONGEST: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// Parses a duration that may be zero (`0s` turns a feature off).
pub fn duration_or_zero(text: String) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(&text) {
        Ok(d) if d > LONGEST => Err(format!("duration `{text}` must be at most 365 days")),
        Ok(d) => Ok(d),
        Err(err) => Err(format!(
            "`{text}` is not a duration such as 500ms or 2s ({err})"
        )),
    }
}

/// Parses an instant in RFC 3339, with its offset: `2026-12-12T20:00:00+08:00`
/// or `2026-12-12T12:00:00Z`.
pub fn instant(text: &str) -> Result<std::time::SystemTime, String> {
    text.parse::<jiff::Timestamp>()
        .and_then(std::time::SystemTime::try_from)
        .map_err(|err| {
            format!("`{text}` is not a time such as 2026-12-12T20:00:00+08:00 (RFC 3339): {err}")
        })
}

/// Accepts a count of at least `min`.
pub fn at_least(min: u64) -> impl Fn(u64) -> Result<u64, String> {
    move |n| {
        if n >= min {
            Ok(n)
        } else {
            Err(format!("must be at least {min}, got {n}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let source = Source::new("x.toml", "a = 1\nbé = \"x\"\n");
        assert_eq!(source.position(0), (1, 1));
        assert_eq!(source.position(6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(source.position(12), (2, 6));
    }

    #[test]
    fn problems_display_as_path_line_column_message() {
        let source = Source::new("conf/x.toml", "a = 1\nb = 2\n");
        let problem = source.problem(10..11, "bad b");
        assert_eq!(problem.to_string(), "conf/x.toml:2:5: bad b");
    }

    #[test]
    fn durations_need_a_unit_and_must_be_positive() {
        assert_eq!(
            duration("250ms".into()),
            Ok(std::time::Duration::from_millis(250))
        );
        assert!(
            duration("0s".into())
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(duration("5".into()).is_err());
        assert!(duration("366days".into()).unwrap_err().contains("at most"));
        assert!(
            duration_or_zero("1000years".into())
                .unwrap_err()
                .contains("at most")
        );
    }
}
