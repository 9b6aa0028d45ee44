//! A session's details: key/value pairs kept sorted by key in one vector.
//!
//! A `BTreeMap` allocates a node for up to eleven entries however few there are; sessions have a
//! handful of details, and a million of them are held in memory, so a sorted vector holds the
//! same pairs in about a third of the space. Lookups are binary searches.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details(Vec<(String, String)>);

impl Details {
    pub fn get(&self, name: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(key, _)| key.as_str().cmp(name))
            .ok()
            .map(|index| &self.0[index].1)
    }

    /// Sets `name` to `value`; returns whether anything changed.
    pub fn upsert(&mut self, name: &str, value: &str) -> bool {
        match self.0.binary_search_by(|(key, _)| key.as_str().cmp(name)) {
            Ok(index) if self.0[index].1 == value => false,
            Ok(index) => {
                self.0[index].1 = value.to_owned();
                true
            }
            Err(index) => {
                self.0.insert(index, (name.to_owned(), value.to_owned()));
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl From<BTreeMap<String, String>> for Details {
    fn from(map: BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order: the vector is sorted as built.
        Details(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_keep_key_order_and_report_changes() {
        let mut details = Details::from(BTreeMap::from([("b".to_owned(), "2".to_owned())]));
        assert!(details.upsert("c", "3"));
        assert!(details.upsert("a", "1"));
        assert!(!details.upsert("b", "2"));
        assert!(details.upsert("b", "two"));
        assert_eq!(
            details.iter().collect::<Vec<_>>(),
            vec![("a", "1"), ("b", "two"), ("c", "3")]
        );
        assert_eq!(details.get("b").map(String::as_str), Some("two"));
        assert_eq!(details.get("d"), None);
        assert_eq!(details.to_map().len(), 3);
    }
}
