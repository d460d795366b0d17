//! The simulated controller's layout: which ports exist and how they are set up, from a TOML file
//! or the documented default.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use super::port::{PortMode, PortSettings};

/// The step time when a layout does not give one.
pub const DEFAULT_STEP_TIME: Duration = Duration::from_secs(2);

/// A checked layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The ports, ids unique and in range.
    pub ports: Vec<PortSettings>,
    /// How long each case state (EREQ, ERSO) lasts.
    pub step_time: Duration,
}

/// Why a layout file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The TOML does not parse or has unknown keys; the message gives line and column.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// `step_time` is zero, so a case operation would never block anything.
    #[error("step_time must be greater than zero")]
    ZeroStepTime,
    /// A port id outside 1–2000.
    #[error("port id {0} is out of range 1-2000")]
    PortId(u32),
    /// Two ports with the same id.
    #[error("port id {0} is defined more than once")]
    DuplicatePort(u32),
    /// A selected bin outside 1–4000000.
    #[error("port {port}: selected_bin {bin} is out of range 1-4000000")]
    SelectedBin {
        /// The port.
        port: u32,
        /// The bin as written.
        bin: u32,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    #[serde(default, with = "humantime_serde")]
    step_time: Option<Duration>,
    #[serde(default)]
    port: Vec<PortEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    id: u32,
    autocase: bool,
    mode: PortMode,
    selected_bin: Option<u32>,
}

// === impl Layout ===

impl Layout {
    /// The documented default: port 1 not AutoCase and OPEN; port 2 AutoCase and CLOSED; port 3
    /// AutoCase, OPEN, no selected bin; port 4 AutoCase, OPEN, selected bin 101337.
    pub fn default_layout() -> Self {
        let port = |id, autocase, mode, selected_bin| PortSettings {
            id,
            autocase,
            mode,
            selected_bin,
        };
        Layout {
            ports: vec![
                port(1, false, PortMode::Open, None),
                port(2, true, PortMode::Closed, None),
                port(3, true, PortMode::Open, None),
                port(4, true, PortMode::Open, Some(101337)),
            ],
            step_time: DEFAULT_STEP_TIME,
        }
    }

    /// Parses and checks a TOML layout.
    pub fn from_toml(text: &str) -> Result<Self, LayoutError> {
        let file: LayoutFile = toml::from_str(text)?;
        let step_time = file.step_time.unwrap_or(DEFAULT_STEP_TIME);
        if step_time.is_zero() {
            return Err(LayoutError::ZeroStepTime);
        }
        let mut seen = BTreeSet::new();
        let mut ports = Vec::with_capacity(file.port.len());
        for entry in file.port {
            if !crate::domain::PORT_ID_RANGE.contains(&entry.id) {
                return Err(LayoutError::PortId(entry.id));
            }
            if !seen.insert(entry.id) {
                return Err(LayoutError::DuplicatePort(entry.id));
            }
            if let Some(bin) = entry.selected_bin
                && !crate::domain::BIN_ID_RANGE.contains(&bin)
            {
                return Err(LayoutError::SelectedBin {
                    port: entry.id,
                    bin,
                });
            }
            ports.push(PortSettings {
                id: entry.id,
                autocase: entry.autocase,
                mode: entry.mode,
                selected_bin: entry.selected_bin,
            });
        }
        Ok(Layout { ports, step_time })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_error(text: &str, expected: &str) {
        match Layout::from_toml(text) {
            Ok(layout) => panic!("expected an error for {text:?}, got {layout:?}"),
            Err(error) => {
                let message = error.to_string();
                assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            }
        }
    }

    #[test]
    fn a_full_layout() {
        let layout = Layout::from_toml(
            r#"
            step_time = "250ms"
            [[port]]
            id = 7
            autocase = true
            mode = "OPEN"
            selected_bin = 42
            [[port]]
            id = 8
            autocase = false
            mode = "MULTIPORT_PUPPET"
            "#,
        )
        .unwrap();
        assert_eq!(layout.step_time, Duration::from_millis(250));
        assert_eq!(layout.ports.len(), 2);
        assert_eq!(layout.ports[0].selected_bin, Some(42));
        assert_eq!(layout.ports[1].mode, PortMode::MultiportPuppet);
    }

    #[test]
    fn an_empty_file_has_no_ports_and_the_default_step() {
        assert_eq!(
            Layout::from_toml("").unwrap(),
            Layout {
                ports: Vec::new(),
                step_time: DEFAULT_STEP_TIME
            }
        );
    }

    #[test]
    fn bad_layouts_say_what_is_wrong() {
        let port =
            |extra: &str| format!("[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\n{extra}");
        check_error(&port("colour = \"red\""), "unknown field `colour`");
        check_error(&port("colour = \"red\""), "line 5");
        check_error(
            "[[port]]\nid = 4\nautocase = true\nmode = \"OPENED\"",
            "unknown variant `OPENED`",
        );
        check_error(
            "[[port]]\nid = 4\nmode = \"OPEN\"",
            "missing field `autocase`",
        );
        check_error(
            "step_time = \"soon\"",
            "invalid value: string \"soon\", expected a duration",
        );
        check_error("step_time = \"0s\"", "step_time must be greater than zero");
        check_error(
            &port("").replace("id = 4", "id = 0"),
            "port id 0 is out of range 1-2000",
        );
        check_error(
            &format!("{}{}", port(""), port("")),
            "port id 4 is defined more than once",
        );
        check_error(
            &port("selected_bin = 4000001"),
            "port 4: selected_bin 4000001 is out of range",
        );
        check_error(&port("").replace("id = 4", "id = -1"), "invalid value");
    }
}
