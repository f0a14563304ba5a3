//! The one placeholder renderer: `{name}` in backup names and descriptions and in SNS rules' jobs,
//! `${name}` in saved templates.
//!
//! Text is scanned once, left to right; a value put in is never scanned again, so a value that
//! contains `{x}` or `${x}` stays as it is and cannot read another value or grow the output
//! exponentially. Every render runs against a [`Budget`] of output bytes and stops as soon as it is
//! spent. This module knows nothing of which names exist: callers answer each name through a lookup
//! that returns the text or a [`RenderError`]. It must not touch I/O.

use std::borrow::Cow;

use serde_json::Value;

/// How a placeholder is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `{name}`: every `{` opens one.
    Braces,
    /// `${name}`: only `${` opens one; a lone `$` or `{` is text.
    Dollar,
}

impl Syntax {
    fn open(self) -> &'static str {
        match self {
            Syntax::Braces => "{",
            Syntax::Dollar => "${",
        }
    }
}

/// Why a text could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// An opening `{` / `${` without its `}`.
    #[error("unclosed `{open}` in `{text}`")]
    Unclosed {
        /// `{` or `${`.
        open: &'static str,
        /// The text (cut to 100 characters).
        text: String,
    },
    /// A name the caller does not know; `known` lists the ones it does, written as placeholders.
    #[error("unknown placeholder `{name}` (use {known})")]
    Unknown {
        /// The placeholder as written.
        name: String,
        /// The known placeholders, comma separated.
        known: String,
    },
    /// A known name that has no value here.
    #[error("no value for `{0}`")]
    Missing(String),
    /// The output would pass the budget.
    #[error("the rendered result would be larger than {0} bytes")]
    TooLarge(usize),
}

impl RenderError {
    /// `name` is not one of `known` (names without braces), in `syntax`.
    pub fn unknown(name: &str, known: &[&str], syntax: Syntax) -> Self {
        let w = |n: &str| format!("{}{n}}}", syntax.open());
        RenderError::Unknown {
            name: w(&cut(name, 100)),
            known: known.iter().map(|k| w(k)).collect::<Vec<_>>().join(", "),
        }
    }
}

fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// How many output bytes a render may still produce.
#[derive(Debug, Clone)]
pub struct Budget {
    limit: usize,
    used: usize,
}

impl Budget {
    /// At most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, used: 0 }
    }

    /// Takes `n` bytes, or fails when that would pass the limit.
    pub fn take(&mut self, n: usize) -> Result<(), RenderError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.limit {
            Err(RenderError::TooLarge(self.limit))
        } else {
            Ok(())
        }
    }
}

/// Splits `text` into literal pieces and placeholder names, calling `piece` for each in order.
fn scan<'t>(
    text: &'t str,
    syntax: Syntax,
    mut piece: impl FnMut(Result<&'t str, &'t str>) -> Result<(), RenderError>,
) -> Result<(), RenderError> {
    let open = syntax.open();
    let mut rest = text;
    while let Some(i) = rest.find(open) {
        piece(Ok(&rest[..i]))?;
        let after = &rest[i + open.len()..];
        let close = after.find('}').ok_or_else(|| RenderError::Unclosed {
            open,
            text: cut(text, 100),
        })?;
        piece(Err(&after[..close]))?;
        rest = &after[close + 1..];
    }
    piece(Ok(rest))
}

/// Every placeholder name in `text`, in order.
pub fn names(text: &str, syntax: Syntax) -> Result<Vec<&str>, RenderError> {
    let mut out = Vec::new();
    scan(text, syntax, |p| {
        if let Err(name) = p {
            out.push(name);
        }
        Ok(())
    })?;
    Ok(out)
}

/// `text` with every placeholder replaced by what `lookup` answers for its name, in one pass.
pub fn render<'v>(
    text: &str,
    syntax: Syntax,
    budget: &mut Budget,
    mut lookup: impl FnMut(&str) -> Result<Cow<'v, str>, RenderError>,
) -> Result<String, RenderError> {
    let mut out = String::new();
    scan(text, syntax, |p| {
        let s = match p {
            Ok(lit) => Cow::Borrowed(lit),
            Err(name) => lookup(name)?,
        };
        budget.take(s.len())?;
        out.push_str(&s);
        Ok(())
    })?;
    Ok(out)
}

/// Renders every string of a JSON document (object keys stay as they are). A string that is exactly
/// one placeholder is first offered to `whole`, which may put a typed value in its place (a
/// template's number or list); otherwise it is rendered as text with `lookup`. The budget counts
/// the rendered strings and the serialised size of whole values.
pub fn render_json<'v>(
    v: &Value,
    syntax: Syntax,
    budget: &mut Budget,
    whole: &dyn Fn(&str) -> Option<&'v Value>,
    lookup: &mut dyn FnMut(&str) -> Result<Cow<'v, str>, RenderError>,
) -> Result<Value, RenderError> {
    Ok(match v {
        Value::String(s) => {
            let only = s
                .strip_prefix(syntax.open())
                .and_then(|r| r.strip_suffix('}'))
                .filter(|n| !n.contains('}'));
            match only.and_then(whole) {
                Some(val) => {
                    budget.take(serde_json::to_string(val).map(|t| t.len()).unwrap_or(0))?;
                    val.clone()
                }
                None => Value::String(render(s, syntax, budget, &mut *lookup)?),
            }
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_json(x, syntax, budget, whole, lookup))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, x) in m {
                budget.take(k.len())?;
                out.insert(k.clone(), render_json(x, syntax, budget, whole, lookup)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Every placeholder name in every string of a JSON document.
pub fn json_names(v: &Value, syntax: Syntax, out: &mut Vec<String>) -> Result<(), RenderError> {
    match v {
        Value::String(s) => out.extend(names(s, syntax)?.into_iter().map(String::from)),
        Value::Array(a) => {
            for x in a {
                json_names(x, syntax, out)?;
            }
        }
        Value::Object(m) => {
            for x in m.values() {
                json_names(x, syntax, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fill(
        text: &str,
        syntax: Syntax,
        vals: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<String, RenderError> {
        render(text, syntax, &mut Budget::new(limit), |n| {
            vals.get(n)
                .map(|v| Cow::Owned(v.clone()))
                .ok_or_else(|| RenderError::unknown(n, &["a", "b"], syntax))
        })
    }

    #[test]
    fn values_are_never_scanned_again() {
        let vals = map(&[("a", "${b}"), ("b", "secret")]);
        assert_eq!(
            fill("x ${a} y", Syntax::Dollar, &vals, 1000).unwrap(),
            "x ${b} y"
        );
        let vals = map(&[("a", "{b}"), ("b", "secret")]);
        assert_eq!(
            fill("{a}-{b}", Syntax::Braces, &vals, 1000).unwrap(),
            "{b}-secret"
        );
    }

    #[test]
    fn the_budget_stops_a_large_output_early() {
        let vals = map(&[("a", &"x".repeat(20_000))]);
        let text = "${a}".repeat(2000);
        assert_eq!(
            fill(&text, Syntax::Dollar, &vals, 65_536),
            Err(RenderError::TooLarge(65_536))
        );
    }

    #[test]
    fn dollar_syntax_leaves_lone_braces_alone_and_braces_syntax_does_not() {
        let vals = map(&[("a", "1")]);
        assert_eq!(
            fill("{x} $ ${a}", Syntax::Dollar, &vals, 100).unwrap(),
            "{x} $ 1"
        );
        assert!(matches!(
            fill("{x}", Syntax::Braces, &vals, 100),
            Err(RenderError::Unknown { .. })
        ));
        assert!(matches!(
            fill("oops {a", Syntax::Braces, &vals, 100),
            Err(RenderError::Unclosed { open: "{", .. })
        ));
        assert_eq!(
            fill("{c}", Syntax::Braces, &vals, 100)
                .unwrap_err()
                .to_string(),
            "unknown placeholder `{c}` (use {a}, {b})"
        );
    }

    #[test]
    fn whole_placeholders_keep_their_type_and_count_against_the_budget() {
        let list = serde_json::json!(["i-1", "i-2"]);
        let doc = serde_json::json!({"ids": "${ids}", "note": "ids: ${ids}"});
        let whole = |n: &str| (n == "ids").then_some(&list);
        let mut lookup = |_: &str| -> Result<Cow<'_, str>, RenderError> { Ok(Cow::Borrowed("L")) };
        let out = render_json(
            &doc,
            Syntax::Dollar,
            &mut Budget::new(100),
            &whole,
            &mut lookup,
        )
        .unwrap();
        assert_eq!(
            out,
            serde_json::json!({"ids": ["i-1", "i-2"], "note": "ids: L"})
        );
        let err = render_json(
            &doc,
            Syntax::Dollar,
            &mut Budget::new(10),
            &whole,
            &mut lookup,
        );
        assert_eq!(err, Err(RenderError::TooLarge(10)));
        let mut found = Vec::new();
        json_names(&doc, Syntax::Dollar, &mut found).unwrap();
        assert_eq!(found, ["ids", "ids"]);
    }
}
