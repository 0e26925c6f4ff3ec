//! Reading Prometheus text exposition: every sample, and the value of one.

use std::collections::BTreeMap;

/// A Prometheus sample: name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                let mut chars = rest.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "label value in {line:?}");
                    let mut v = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => v.push(chars.next().unwrap_or('\\')),
                            '"' => break,
                            c => v.push(c),
                        }
                    }
                    labels.insert(key.trim_start_matches(',').to_owned(), v);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the one sample `name` whose labels include `labels`.
#[track_caller]
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one sample {name}{labels:?}, found {found:?}"
    );
    found[0]
}
