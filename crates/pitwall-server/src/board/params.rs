//! The board's URL parameters: the filter a view is shared with (`data_source`, `identifier`,
//! `detail=key=value`, each as often as wanted where it makes sense), and the numbers its
//! endpoints take.

use percent_encoding::percent_decode_str;
use pitwall_core::Limits;
use pitwall_proto::feed::{DetailEquals, SessionFilter};

/// The decoded `name=value` pairs of a query string, in order.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// `+` is a space and `%XX` a byte, as browsers encode forms; bytes that are not UTF-8
    /// are refused rather than guessed at.
    pub fn parse(query: Option<&str>) -> Result<Params, String> {
        let mut pairs = Vec::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            pairs.push((decode(name)?, decode(value)?));
        }
        Ok(Params(pairs))
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, value)| value.as_str())
    }

    /// The last non-empty value of `name`.
    pub fn one(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, value)| n == name && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }

    /// A whole number `name`, `default` when absent, at most `max`.
    pub fn number(&self, name: &str, default: u64, max: u64) -> Result<u64, String> {
        match self.one(name) {
            None => Ok(default),
            Some(text) => text
                .parse::<u64>()
                .map(|n| n.min(max))
                .map_err(|_| format!("{name} '{text}' is not a whole number")),
        }
    }

    /// The filter: data sources checked as writes check them, details as `key=value`.
    pub fn filter(&self, limits: &Limits) -> Result<SessionFilter, String> {
        let mut filter = SessionFilter::default();
        for data_source in self.all("data_source").filter(|d| !d.is_empty()) {
            limits
                .check_data_source(data_source)
                .map_err(|rejection| rejection.to_string())?;
            filter.data_sources.push(data_source.to_owned());
        }
        filter.identifier_glob = self.one("identifier").unwrap_or_default().to_owned();
        for detail in self.all("detail").filter(|d| !d.is_empty()) {
            let Some((key, value)) = detail.split_once('=') else {
                return Err(format!(
                    "detail '{detail}' has no '='; write it as key=value"
                ));
            };
            filter.details.push(DetailEquals {
                key: key.to_owned(),
                value: value.to_owned(),
            });
        }
        Ok(filter)
    }
}

fn decode(text: &str) -> Result<String, String> {
    percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| format!("the query string holds '{text}', which is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_view_reads_back_as_its_filter() {
        let params = Params::parse(Some(
            "data_source=Car1&data_source=Car2&identifier=FP%2A&detail=driver%3DA.+Driver&tv=1",
        ))
        .unwrap();
        let filter = params.filter(&Limits::default()).unwrap();
        assert_eq!(filter.data_sources, ["Car1", "Car2"]);
        assert_eq!(filter.identifier_glob, "FP*");
        assert_eq!(filter.details[0].key, "driver");
        assert_eq!(filter.details[0].value, "A. Driver");
        assert_eq!(params.one("tv"), Some("1"));
    }

    #[test]
    fn malformed_parameters_say_what_to_write() {
        let limits = Limits::default();
        let no_equals = Params::parse(Some("detail=driver"))
            .unwrap()
            .filter(&limits);
        assert!(no_equals.unwrap_err().contains("key=value"));
        let bad_source = Params::parse(Some("data_source=a+b"))
            .unwrap()
            .filter(&limits);
        assert!(bad_source.unwrap_err().contains("space"));
        let bad_number = Params::parse(Some("after=x"))
            .unwrap()
            .number("after", 0, 10);
        assert!(bad_number.unwrap_err().contains("whole number"));
        assert!(Params::parse(Some("identifier=%FF")).is_err());
    }
}
