//! Which retrieved passages are added and how: nearest first, within the distance cut-off,
//! up to `top_k` and the token cap (estimated at 4 bytes a token, like every sluice estimate);
//! rendered with the passage template, joined, and put in the template.

use crate::config::Retrieval;
use crate::store::Match;
use sluice_core::usage::estimate_tokens_from_bytes;

/// The passages to add, rendered, in order (each already within the budget).
pub fn select(matches: &[Match], r: &Retrieval) -> Vec<String> {
    let mut out = Vec::new();
    let mut tokens: u64 = estimate_tokens_from_bytes(r.template.len());
    for m in matches.iter().filter(|m| m.distance <= r.max_distance).take(r.top_k) {
        let Some(text) = m.document.as_deref().map(str::trim).filter(|t| !t.is_empty()) else { continue };
        let source = m.metadata.get("source").and_then(|v| v.as_str()).unwrap_or(m.id.as_str());
        let rendered = render_passage(&r.passage_template, text, source, m.distance);
        let sep = if out.is_empty() { 0 } else { estimate_tokens_from_bytes(r.separator.len()) };
        let need = estimate_tokens_from_bytes(rendered.len()).saturating_add(sep);
        if tokens.saturating_add(need) <= r.max_added_tokens {
            tokens = tokens.saturating_add(need);
            out.push(rendered);
        } else if out.is_empty() {
            // The nearest passage alone is over the cap: add what fits of it.
            let room =
                usize::try_from(r.max_added_tokens.saturating_sub(tokens).saturating_mul(4)).unwrap_or(usize::MAX);
            let cut = sluice_core::json::cut(&rendered, room).to_string();
            if !cut.is_empty() {
                out.push(cut);
            }
            break;
        } else {
            break;
        }
    }
    out
}

fn render_passage(template: &str, text: &str, source: &str, distance: f32) -> String {
    let d = (distance.max(0.0) * 1000.0).round() as u64;
    template
        .replace("{{source}}", source)
        .replace("{{distance}}", &format!("{}.{:03}", d / 1000, d % 1000))
        .replace("{{text}}", text)
}

/// The text added to the request.
pub fn render(passages: &[String], r: &Retrieval) -> String {
    r.template.replace("{{passages}}", &passages.join(&r.separator))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn m(id: &str, d: f32, text: &str) -> Match {
        let mut meta = Map::new();
        meta.insert("source".into(), json!(format!("{id}.md")));
        Match { id: id.into(), distance: d, document: Some(text.into()), metadata: meta }
    }

    #[test]
    fn nearest_within_cut_off_and_top_k() {
        let r = Retrieval {
            top_k: 2,
            max_distance: 0.5,
            passage_template: "[{{source}} {{distance}}] {{text}}".into(),
            ..Retrieval::default()
        };
        let got = select(&[m("a", 0.1, "alpha"), m("b", 0.45, " beta "), m("c", 0.2, "gamma"), m("d", 0.9, "far")], &r);
        assert_eq!(got, ["[a.md 0.100] alpha", "[b.md 0.450] beta"]);
        let text = render(&got, &r);
        assert!(text.contains("[a.md 0.100] alpha\n\n[b.md 0.450] beta"), "{text}");
        assert!(select(&[m("d", 0.9, "far")], &r).is_empty(), "nothing close enough: nothing added");
        assert!(select(&[m("e", 0.1, "   ")], &r).is_empty());
    }

    #[test]
    fn the_token_cap_holds() {
        let r = Retrieval { max_added_tokens: 60, template: "{{passages}}".into(), ..Retrieval::default() };
        let long = "x".repeat(200); // 50 tokens
        let got = select(&[m("a", 0.1, &long), m("b", 0.2, &long)], &r);
        assert_eq!(got.len(), 1, "the second passage would pass the cap");
        let tiny = Retrieval { max_added_tokens: 10, template: "{{passages}}".into(), ..Retrieval::default() };
        let got = select(&[m("a", 0.1, &long)], &tiny);
        assert_eq!(got[0].len(), 28, "the nearest passage is cut to what fits (10 tokens less the template's 3)");
    }
}
