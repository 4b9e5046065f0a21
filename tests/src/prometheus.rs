//! Reading the Prometheus text exposition an agent serves on `/metrics`.

use std::collections::BTreeMap;

/// One sample: metric name, labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample in `text`; comment lines (`# HELP`, `# TYPE`, `# EOF`) are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (&line[..open], parse_labels(&line[open + 1..close])?, &line[close + 1..])
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], BTreeMap::new(), &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name: name.to_string(), labels, value })
}

/// `a="x",b="y"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// The value of the sample named `name` whose labels include all of `labels`;
/// `None` if there is none. Several matches are summed.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels_are_read() {
        let text = "# HELP trellis_connections Proxied connections opened.\n\
                    # TYPE trellis_connections counter\n\
                    trellis_connections_total{role=\"gateway\",resource=\"rcfg-1\",endpoint=\"vpce-1\",consumer_account=\"acct-1\"} 4\n\
                    trellis_up 1\n\
                    odd{a=\"x\\\"y\"} 2.5\n\
                    # EOF\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(
            value(&samples, "trellis_connections_total", &[("role", "gateway"), ("endpoint", "vpce-1")]),
            Some(4.0)
        );
        assert_eq!(value(&samples, "trellis_connections_total", &[("role", "endpoint")]), None);
        assert_eq!(value(&samples, "trellis_up", &[]), Some(1.0));
        assert_eq!(samples[2].labels["a"], "x\"y");
    }
}
