//! The file being validated, for errors that name it and the line of the value they are about
//! (from the span toml recorded for it).
use std::{ops::Range, path::Path};

use toml::Spanned;

use super::ConfigError;

/// The file being validated, for errors that name it and a line in it.
pub(super) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// `message` (which starts with the key) about the value at `span`; `None` for a key the
    /// file leaves out, reported at line 1.
    pub(super) fn invalid(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: span.map_or(1, |span| line_column(self.text, span.start).0),
            message,
        }
    }

    pub(super) fn invalid_at<T>(&self, value: &Spanned<T>, message: String) -> ConfigError {
        self.invalid(Some(value.span()), message)
    }
}

/// 1-based line and column of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_is_one_based() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
