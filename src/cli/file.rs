//! The `serve --config` file: every `serve` setting in TOML, under the flag's name with
//! underscores (`upstream_timeout = "10s"`). Unknown keys and bad values are errors that give the
//! file's line; relative paths are taken from the file's own folder.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::config::{AccessLog, redact_userinfo};

/// What a config file may hold; everything is optional, and a flag or environment variable wins
/// over the file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServeFile {
    pub(super) listen: Option<SocketAddr>,
    pub(super) upstream: Option<String>,
    #[serde(default, with = "duration")]
    pub(super) upstream_timeout: Option<Duration>,
    pub(super) upstream_format: Option<super::UpstreamFormat>,
    #[serde(default, with = "duration")]
    pub(super) retry_delay: Option<Duration>,
    pub(super) max_response_bytes: Option<NonZeroUsize>,
    #[serde(default, with = "duration")]
    pub(super) shutdown_grace: Option<Duration>,
    #[serde(default, with = "duration")]
    pub(super) health_interval: Option<Duration>,
    pub(super) max_in_flight: Option<NonZeroUsize>,
    pub(super) auth_tokens_file: Option<PathBuf>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) tls_client_ca: Option<PathBuf>,
    pub(super) upstream_ca: Option<PathBuf>,
    pub(super) upstream_client_cert: Option<PathBuf>,
    pub(super) upstream_client_key: Option<PathBuf>,
    pub(super) metrics_listen: Option<SocketAddr>,
    pub(super) cors_allow_origin: Option<Vec<String>>,
    pub(super) log_format: Option<super::LogFormat>,
    pub(super) access_log: Option<AccessLog>,
    pub(super) simulator: Option<bool>,
    pub(super) simulator_config: Option<PathBuf>,
    #[serde(default, with = "duration")]
    pub(super) handshake_timeout: Option<Duration>,
    #[serde(default, with = "duration")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_connections: Option<NonZeroUsize>,
    pub(super) max_concurrent_streams: Option<NonZeroU32>,
    pub(super) max_health_watches: Option<NonZeroUsize>,
    #[serde(default, with = "duration")]
    pub(super) metrics_header_read_timeout: Option<Duration>,
    #[serde(default, with = "duration")]
    pub(super) metrics_idle_timeout: Option<Duration>,
    #[serde(default, with = "duration")]
    pub(super) metrics_body_read_timeout: Option<Duration>,
    pub(super) metrics_max_connections: Option<NonZeroUsize>,
}

impl ServeFile {
    /// Reads a config file; relative paths in it are made relative to its folder.
    pub(super) fn load(path: &Path) -> anyhow::Result<ServeFile> {
        let text = crate::regular_file::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut file: ServeFile = toml::from_str(&text)
            // A TOML error quotes the line it is about, which may be the upstream URL's.
            .map_err(|error| anyhow::anyhow!("{}", redact_userinfo(&error.to_string())))
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let folder = path.parent().unwrap_or(Path::new("."));
        for path in [
            &mut file.auth_tokens_file,
            &mut file.tls_cert,
            &mut file.tls_key,
            &mut file.tls_client_ca,
            &mut file.upstream_ca,
            &mut file.upstream_client_cert,
            &mut file.upstream_client_key,
            &mut file.simulator_config,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = folder.join(&*path);
            }
        }
        Ok(file)
    }

    /// The file as TOML, as `--print-config` shows it.
    pub(super) fn to_toml(&self) -> String {
        // Every field is a string, number, boolean or path, which TOML always represents.
        toml::to_string(self)
            .unwrap_or_else(|error| format!("# cannot print the config: {error}\n"))
    }
}

/// Durations as humantime strings ("10s", "1m 30s"), so a bad one is reported at its line.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(Some).map_err(|error| {
            serde::de::Error::custom(format!(
                "'{text}' is not a duration such as \"10s\" or \"500ms\": {error}"
            ))
        })
    }

    pub(super) fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => {
                serializer.serialize_str(&humantime::format_duration(*duration).to_string())
            }
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeFile, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    #[test]
    fn a_full_file_round_trips() {
        let file = parse(
            r#"
            listen = "0.0.0.0:50051"
            upstream = "http://10.0.0.5:44000/api/v2/task"
            upstream_timeout = "2s 500ms"
            upstream_format = "json"
            max_in_flight = 64
            simulator = false
            log_format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(file.upstream_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(file.max_in_flight, NonZeroUsize::new(64));
        let printed = file.to_toml();
        assert!(
            printed.contains("upstream_timeout = \"2s 500ms\""),
            "{printed}"
        );
        assert!(printed.contains("upstream_format = \"json\""), "{printed}");
        assert!(parse(&printed).is_ok(), "{printed}");
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let check = |text: &str, expected: &[&str]| {
            let message = parse(text).unwrap_err();
            for part in expected {
                assert!(message.contains(part), "{part:?} missing from {message}");
            }
        };
        check(
            "listen = \"127.0.0.1:1\"\nupstream_timeot = \"1s\"\n",
            &["line 2", "unknown field `upstream_timeot`"],
        );
        check(
            "\n\nupstream_timeout = \"soon\"\n",
            &["line 3", "upstream_timeout", "'soon' is not a duration"],
        );
        check("max_in_flight = 0\n", &["line 1", "max_in_flight"]);
        check("listen = \"nowhere\"\n", &["line 1", "listen"]);
        check(
            "upstream_format = \"yaml\"\n",
            &["line 1", "unknown variant `yaml`"],
        );
    }
}
