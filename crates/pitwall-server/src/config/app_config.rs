//! The reference's `AppConfig.json`: the keys Pitwall reads (property names case-sensitive, as
//! the reference reads them), Pitwall's own `Pitwall` object in the same file, and what each
//! key does to a [`Config`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pitwall_core::lifecycle::{AutoEndPolicy, PolicyOverride};
use serde_json::{Map, Value};
use thiserror::Error;

use super::{Config, StoreConfig, StreamLayout};

/// The keys of the reference's `AppConfig.json` that Pitwall reads. Property names are
/// case-sensitive, as the reference reads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppConfig {
    pub stream_api_port: Option<u16>,
    pub prometheus_metric_port: Option<u16>,
    pub integrate_session_management: Option<bool>,
    pub broker_url: Option<String>,
    pub stream_creation_strategy: Option<u8>,
    pub partition_mappings: Vec<PartitionMapping>,
    pub initialisation_timeout_seconds: Option<u64>,
    pub use_remote_key_generator: Option<bool>,
    pub remote_key_generator_service_address: Option<String>,
    pub batching_responses: Option<bool>,
    /// Read and noted: data formats are always rebuilt from the essentials (see
    /// [`AppConfig::notes`]).
    pub integrate_data_format_management: Option<bool>,
    /// Pitwall's own settings, under the key `Pitwall` (the reference ignores it).
    pub pitwall: PitwallSection,
    /// What the file held besides the keys above: each line says which key and what Pitwall
    /// does with it. The caller logs them.
    pub notes: Vec<String>,
}

/// The `Pitwall` object of the config file:
///
/// ```json
/// "Pitwall": {
///   "auto_end": { "idle_after": "30m", "max_duration": "12h",
///                 "data_sources": { "Rig1": { "idle_after": "5m", "max_duration": "off" } } },
///   "retention": { "completed_for": "30days" },
///   "feed": { "max_events": 100000, "max_age": "24h" }
/// }
/// ```
///
/// Durations are written as `90s`, `30m`, `12h`, `7days` (or combined: `1h 30m`); `off` turns
/// a rule off. Each setting left out keeps its default (or its flag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PitwallSection {
    pub idle_after: Option<Option<Duration>>,
    pub max_duration: Option<Option<Duration>>,
    pub data_sources: BTreeMap<String, PolicyOverride>,
    pub completed_for: Option<Option<Duration>>,
    pub feed_max_events: Option<u64>,
    pub feed_max_age: Option<Option<Duration>>,
}

/// A duration setting: `off`, or a duration such as `30m`.
pub fn parse_duration_setting(text: &str) -> Result<Option<Duration>, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!("'{text}' is zero; write 'off' to turn it off")),
        Ok(d) => Ok(Some(d)),
        Err(e) => Err(format!(
            "'{text}' is not a duration ({e}); write e.g. 90s, 30m, 12h, 7days, or off"
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMapping {
    pub stream: String,
    pub partition: u32,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config file {path}: the top level must be a JSON object")]
    NotAnObject { path: PathBuf },
    #[error(
        "config file {path}: UseRemoteKeyGenerator is true but RemoteKeyGeneratorServiceAddress is empty; give the generator's host:port"
    )]
    NoKeyGeneratorAddress { path: PathBuf },
    #[error("config file {path}: {setting} {problem}")]
    Setting {
        path: PathBuf,
        setting: String,
        problem: String,
    },
    #[error("config file {path}: key '{key}' {problem}")]
    Key {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

impl AppConfig {
    pub fn load(path: &Path) -> Result<AppConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_owned(),
            source,
        })?;
        let Value::Object(map) = value else {
            return Err(ConfigError::NotAnObject {
                path: path.to_owned(),
            });
        };
        AppConfig::from_map(path, map)
    }

    fn from_map(path: &Path, mut map: Map<String, Value>) -> Result<AppConfig, ConfigError> {
        let mut keys = Keys {
            path,
            map: &mut map,
        };
        let mut config = AppConfig {
            stream_api_port: keys.port("StreamApiPort")?,
            prometheus_metric_port: keys.port("PrometheusMetricPort")?,
            integrate_session_management: keys.bool("IntegrateSessionManagement")?,
            broker_url: keys.string("BrokerUrl")?,
            stream_creation_strategy: keys.strategy("StreamCreationStrategy")?,
            partition_mappings: keys.partition_mappings("PartitionMappings")?,
            initialisation_timeout_seconds: keys.unsigned("InitialisationTimeoutSeconds")?,
            use_remote_key_generator: keys.bool("UseRemoteKeyGenerator")?,
            remote_key_generator_service_address: keys
                .string("RemoteKeyGeneratorServiceAddress")?,
            batching_responses: keys.bool("BatchingResponses")?,
            integrate_data_format_management: keys.bool("IntegrateDataFormatManagement")?,
            pitwall: keys.pitwall("Pitwall")?,
            notes: Vec::new(),
        };
        // The reference's switch turns its replay of data formats off, after which its ids are
        // unknown after a restart. Pitwall's replay reads its own essentials, with no broker
        // and no quiet period, so it always runs: ids stay stable across restarts.
        match config.integrate_data_format_management {
            Some(true) => config.notes.push(
                "IntegrateDataFormatManagement is true: data formats are rebuilt from each data \
                 source's essentials (at startup; on a broker at the data source's first use) \
                 and followed while the server runs (Pitwall always does so)"
                    .to_owned(),
            ),
            Some(false) => config.notes.push(
                "IntegrateDataFormatManagement is false, which Pitwall does not follow: data \
                 formats are always rebuilt from each data source's essentials, so that their \
                 ids stay valid across restarts"
                    .to_owned(),
            ),
            None => {}
        }
        for key in map.keys() {
            config.notes.push(format!(
                "unknown key '{key}' in {}; it is ignored (keys are case-sensitive)",
                path.display()
            ));
        }
        Ok(config)
    }

    /// Sets what the file's keys say on `config`: the reference's keys, then the `Pitwall`
    /// object. What comes later in the layering (variables, flags) is set on top by the caller.
    pub fn apply(&self, path: &Path, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(port) = self.stream_api_port {
            config.listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        }
        if let Some(port) = self.prometheus_metric_port {
            config.metrics_listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        }
        if let Some(enabled) = self.integrate_session_management {
            config.integrate_session_management = enabled;
        }
        if let Some(enabled) = self.batching_responses {
            config.batching.enabled = enabled;
        }
        config.stream_layout = match self.stream_creation_strategy {
            Some(2) => StreamLayout::TopicBased,
            _ => StreamLayout::PartitionBased(
                self.partition_mappings
                    .iter()
                    .map(|m| (m.stream.clone(), m.partition))
                    .collect(),
            ),
        };
        let section = &self.pitwall;
        config.auto_end.default = AutoEndPolicy {
            idle_after: section
                .idle_after
                .unwrap_or(config.auto_end.default.idle_after),
            max_duration: section
                .max_duration
                .unwrap_or(config.auto_end.default.max_duration),
        };
        config.auto_end.data_sources = section.data_sources.clone();
        if let Some(retention) = section.completed_for {
            config.retention = retention;
        }
        if let Some(max_events) = section.feed_max_events {
            config.feed_window.max_events = max_events;
        }
        if let Some(max_age) = section.feed_max_age {
            config.feed_window.max_age = max_age;
        }
        if self.use_remote_key_generator == Some(true) {
            match self.remote_key_generator_service_address.as_deref() {
                Some(address) if !address.trim().is_empty() => {
                    config.remote_key_generator = Some(address.trim().to_owned());
                }
                _ => {
                    return Err(ConfigError::NoKeyGeneratorAddress {
                        path: path.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Keys read but without effect with this store, for the startup log. The stream layout
    /// keys apply to both stores: the embedded packet log keeps the same spaces.
    pub fn unused_here(&self, store: &StoreConfig) -> Vec<String> {
        let embedded = *store == StoreConfig::Embedded;
        let mut unused = Vec::new();
        if self.broker_url.is_some() && embedded {
            unused.push(
                "BrokerUrl is ignored: the embedded store needs no broker (choose a broker store with --store)"
                    .to_owned(),
            );
        }
        if self.initialisation_timeout_seconds.is_some() {
            unused.push(
                "InitialisationTimeoutSeconds is ignored: Pitwall is ready once its store is \
                 fully read, not after a quiet period"
                    .to_owned(),
            );
        }
        unused
    }
}

/// Takes typed keys out of the JSON object, so what remains is what Pitwall does not read.
struct Keys<'a> {
    path: &'a Path,
    map: &'a mut Map<String, Value>,
}

impl Keys<'_> {
    /// The value of `key`; a JSON `null` counts as absent, as in the reference.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn error(&self, key: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: self.path.to_owned(),
            key,
            problem: problem.into(),
        }
    }

    fn unsigned(&mut self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("must be a non-negative integer, not {v}"))),
        }
    }

    fn port(&mut self, key: &'static str) -> Result<Option<u16>, ConfigError> {
        match self.unsigned(key)? {
            None => Ok(None),
            Some(n) => u16::try_from(n)
                .map(Some)
                .map_err(|_| self.error(key, format!("must be a port (0 to 65535), not {n}"))),
        }
    }

    fn bool(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("must be true or false, not {v}"))),
        }
    }

    fn string(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(key, format!("must be a string, not {v}"))),
        }
    }

    fn strategy(&mut self, key: &'static str) -> Result<Option<u8>, ConfigError> {
        match self.unsigned(key)? {
            None => Ok(None),
            Some(n @ (1 | 2)) => Ok(Some(n as u8)),
            Some(n) => Err(self.error(
                key,
                format!("must be 1 (partition-based) or 2 (topic-based), not {n}"),
            )),
        }
    }

    fn pitwall(&mut self, key: &'static str) -> Result<PitwallSection, ConfigError> {
        let Some(value) = self.take(key) else {
            return Ok(PitwallSection::default());
        };
        let section = Section {
            path: self.path,
            name: key.to_owned(),
            value: &value,
        };
        section.check_keys(&["auto_end", "retention", "feed"])?;
        let auto_end = section.child("auto_end")?;
        let retention = section.child("retention")?;
        let feed = section.child("feed")?;
        let mut data_sources = BTreeMap::new();
        if let Some(auto_end) = &auto_end {
            auto_end.check_keys(&["idle_after", "max_duration", "data_sources"])?;
            if let Some(sources) = auto_end.child("data_sources")? {
                for (data_source, _) in sources.object()? {
                    let policy = sources
                        .child(data_source)?
                        .expect("the key was just listed");
                    policy.check_keys(&["idle_after", "max_duration"])?;
                    data_sources.insert(
                        data_source.clone(),
                        PolicyOverride {
                            idle_after: policy.duration("idle_after")?,
                            max_duration: policy.duration("max_duration")?,
                        },
                    );
                }
            }
        }
        if let Some(retention) = &retention {
            retention.check_keys(&["completed_for"])?;
        }
        if let Some(feed) = &feed {
            feed.check_keys(&["max_events", "max_age"])?;
        }
        let feed_max_events = match &feed {
            Some(feed) => feed.count("max_events")?,
            None => None,
        };
        Ok(PitwallSection {
            idle_after: auto_end
                .as_ref()
                .map(|a| a.duration("idle_after"))
                .transpose()?
                .flatten(),
            max_duration: auto_end
                .as_ref()
                .map(|a| a.duration("max_duration"))
                .transpose()?
                .flatten(),
            data_sources,
            completed_for: retention
                .as_ref()
                .map(|r| r.duration("completed_for"))
                .transpose()?
                .flatten(),
            feed_max_events,
            feed_max_age: feed
                .as_ref()
                .map(|f| f.duration("max_age"))
                .transpose()?
                .flatten(),
        })
    }

    fn partition_mappings(
        &mut self,
        key: &'static str,
    ) -> Result<Vec<PartitionMapping>, ConfigError> {
        let Some(value) = self.take(key) else {
            return Ok(Vec::new());
        };
        let shape = r#"must be a list of {"Stream": name, "Partition": n}"#;
        let Value::Array(items) = value else {
            return Err(self.error(key, shape));
        };
        items
            .iter()
            .map(|item| {
                let stream = item.get("Stream").and_then(Value::as_str);
                let partition = item
                    .get("Partition")
                    .and_then(Value::as_u64)
                    .and_then(|p| u32::try_from(p).ok());
                match (stream, partition) {
                    (Some(stream), Some(partition)) => Ok(PartitionMapping {
                        stream: stream.to_owned(),
                        partition,
                    }),
                    _ => Err(self.error(key, format!("{shape}; found {item}"))),
                }
            })
            .collect()
    }
}

/// A nested object of the `Pitwall` section, named by its dotted path for errors.
struct Section<'a> {
    path: &'a Path,
    name: String,
    value: &'a Value,
}

impl<'a> Section<'a> {
    fn error(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Setting {
            path: self.path.to_owned(),
            setting: self.name.clone(),
            problem: problem.into(),
        }
    }

    fn object(&self) -> Result<&'a Map<String, Value>, ConfigError> {
        self.value
            .as_object()
            .ok_or_else(|| self.error(format!("must be an object, not {}", self.value)))
    }

    fn check_keys(&self, known: &[&str]) -> Result<(), ConfigError> {
        for key in self.object()?.keys() {
            if !known.contains(&key.as_str()) {
                return Err(self.error(format!(
                    "has an unknown key '{key}'; known keys: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn child(&self, key: &str) -> Result<Option<Section<'a>>, ConfigError> {
        Ok(self
            .object()?
            .get(key)
            .filter(|v| !v.is_null())
            .map(|value| Section {
                path: self.path,
                name: format!("{}.{key}", self.name),
                value,
            }))
    }

    fn duration(&self, key: &str) -> Result<Option<Option<Duration>>, ConfigError> {
        let Some(child) = self.child(key)? else {
            return Ok(None);
        };
        match child.value {
            Value::String(text) => parse_duration_setting(text)
                .map(Some)
                .map_err(|e| child.error(e)),
            other => Err(child.error(format!(
                "must be a duration string such as \"30m\" or \"off\", not {other}"
            ))),
        }
    }

    fn count(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        let Some(child) = self.child(key)? else {
            return Ok(None);
        };
        match child.value.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(child.error(format!("must be a positive integer, not {}", child.value))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AppConfig, ConfigError> {
        let Value::Object(map) = serde_json::from_str(json).unwrap() else {
            panic!("test JSON must be an object");
        };
        AppConfig::from_map(Path::new("AppConfig.json"), map)
    }

    #[test]
    fn the_reference_sample_is_read() {
        let config = parse(
            r#"{
                "StreamCreationStrategy": 1,
                "BrokerUrl": "localhost:9092",
                "PartitionMappings": [
                    {"Stream": "Stream1", "Partition": 1},
                    {"Stream": "Stream2", "Partition": 2}
                ],
                "StreamApiPort": 13579,
                "IntegrateSessionManagement": true,
                "IntegrateDataFormatManagement": true,
                "UseRemoteKeyGenerator": false,
                "RemoteKeyGeneratorServiceAddress": "",
                "BatchingResponses": false,
                "PrometheusMetricPort": 10010
            }"#,
        )
        .unwrap();
        assert_eq!(config.stream_api_port, Some(13579));
        assert_eq!(config.prometheus_metric_port, Some(10010));
        assert_eq!(config.partition_mappings.len(), 2);
        // IntegrateDataFormatManagement is read and noted; BatchingResponses is read.
        assert_eq!(config.batching_responses, Some(false));
        assert_eq!(config.notes.len(), 1, "{:?}", config.notes);
    }

    #[test]
    fn data_format_management_is_read_and_its_note_says_formats_are_always_rebuilt() {
        for (value, expected) in [("true", "is true"), ("false", "does not follow")] {
            let config =
                parse(&format!(r#"{{"IntegrateDataFormatManagement": {value}}}"#)).unwrap();
            assert_eq!(
                config.integrate_data_format_management,
                Some(value == "true")
            );
            assert_eq!(config.notes.len(), 1, "{:?}", config.notes);
            assert!(config.notes[0].contains(expected), "{:?}", config.notes);
            assert!(config.notes[0].contains("rebuilt"), "{:?}", config.notes);
        }
        let broker = StoreConfig::broker("b:9092".into(), "t".into(), Duration::from_secs(1));
        let config = parse(r#"{"IntegrateDataFormatManagement": true}"#).unwrap();
        // Both stores keep data formats.
        assert!(config.unused_here(&StoreConfig::Embedded).is_empty());
        assert!(config.unused_here(&broker).is_empty());
    }

    #[test]
    fn unknown_and_wrongly_cased_keys_are_reported() {
        let config = parse(r#"{"streamApiPort": 1, "Colour": "red"}"#).unwrap();
        assert_eq!(config.stream_api_port, None);
        assert_eq!(config.notes.len(), 2);
        assert!(config.notes.iter().any(|n| n.contains("'streamApiPort'")));
    }

    #[test]
    fn a_wrongly_typed_key_names_the_key() {
        let err = parse(r#"{"StreamApiPort": "13579"}"#).unwrap_err();
        assert!(err.to_string().contains("StreamApiPort"), "{err}");
        assert!(parse(r#"{"StreamApiPort": 70000}"#).is_err());
        assert!(parse(r#"{"StreamCreationStrategy": 3}"#).is_err());
    }

    #[test]
    fn null_values_take_the_default() {
        assert_eq!(
            parse(r#"{"StreamApiPort": null}"#).unwrap().stream_api_port,
            None
        );
    }

    #[test]
    fn the_feature_switch_is_read() {
        let app = parse(r#"{"IntegrateSessionManagement": false}"#).unwrap();
        let mut config = Config::default();
        app.apply(Path::new("AppConfig.json"), &mut config).unwrap();
        assert!(!config.integrate_session_management);
    }

    #[test]
    fn the_remote_key_generator_needs_an_address() {
        let path = Path::new("AppConfig.json");
        let mut config = Config::default();
        let app = parse(
            r#"{"UseRemoteKeyGenerator": true, "RemoteKeyGeneratorServiceAddress": "keys:15379"}"#,
        )
        .unwrap();
        app.apply(path, &mut config).unwrap();
        assert_eq!(config.remote_key_generator.as_deref(), Some("keys:15379"));
        let without = parse(r#"{"UseRemoteKeyGenerator": true}"#).unwrap();
        let err = without.apply(path, &mut Config::default()).unwrap_err();
        assert!(err.to_string().contains("RemoteKeyGeneratorServiceAddress"));
    }

    #[test]
    fn the_pitwall_section_sets_auto_end_retention_and_the_feed_window() {
        let app = parse(
            r#"{
                "Pitwall": {
                    "auto_end": {
                        "idle_after": "30m",
                        "data_sources": {
                            "Rig1": { "idle_after": "5m", "max_duration": "2h" },
                            "Car1": { "idle_after": "off" }
                        }
                    },
                    "retention": { "completed_for": "7days" },
                    "feed": { "max_events": 5000, "max_age": "off" }
                }
            }"#,
        )
        .unwrap();
        let mut config = Config::default();
        app.apply(Path::new("AppConfig.json"), &mut config).unwrap();
        let minutes = |m: u64| Some(Duration::from_secs(m * 60));
        assert_eq!(config.auto_end.policy_for("Other").idle_after, minutes(30));
        assert_eq!(config.auto_end.policy_for("Other").max_duration, None);
        assert_eq!(config.auto_end.policy_for("Rig1").idle_after, minutes(5));
        assert_eq!(
            config.auto_end.policy_for("Rig1").max_duration,
            minutes(120)
        );
        assert!(config.auto_end.policy_for("Car1").is_off());
        assert_eq!(config.auto_end.shortest(), minutes(5));
        assert_eq!(config.retention, Some(Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(config.feed_window.max_events, 5000);
        assert_eq!(config.feed_window.max_age, None);
    }

    #[test]
    fn a_bad_pitwall_setting_names_its_path() {
        let error = parse(r#"{"Pitwall": {"auto_end": {"idle_after": "soon"}}}"#).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("Pitwall.auto_end.idle_after"), "{message}");
        assert!(message.contains("'soon'"), "{message}");
        let error = parse(r#"{"Pitwall": {"retention": {"keep": "1h"}}}"#).unwrap_err();
        assert!(error.to_string().contains("unknown key 'keep'"), "{error}");
        let error = parse(r#"{"Pitwall": {"feed": {"max_events": 0}}}"#).unwrap_err();
        assert!(
            error.to_string().contains("Pitwall.feed.max_events"),
            "{error}"
        );
    }
}
