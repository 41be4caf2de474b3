//! The text forms of the options: environment variables (`from_env`, `from_lookup`, the
//! warning for a variable that is no option) and deserialisation, with the units of
//! eventsource-py's names; an option given twice is refused.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::*;

/// Parses an option's text form, naming the option when it does not parse.
pub(super) fn parse_text<T: std::str::FromStr>(
    key: &'static str,
    raw: &str,
) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    raw.trim()
        .parse::<T>()
        .map_err(|e| ConfigError::new(key, format!("{raw:?} does not parse: {e}")))
}

/// A duration written as a number of seconds.
pub(super) fn text_secs(key: &'static str, secs: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        ConfigError::new(
            key,
            format!("{secs} is not a duration (a non-negative number of seconds)"),
        )
    })
}

impl RedisEventBusConfig {
    /// Reads options from environment variables: `EVENTSOURCE_REDIS_` followed by the option's
    /// text key in upper case (see [`TEXT_KEYS`](Self::TEXT_KEYS): `EVENTSOURCE_REDIS_URL`,
    /// `EVENTSOURCE_REDIS_STREAM_PREFIX`, `EVENTSOURCE_REDIS_BLOCK_MS` in milliseconds,
    /// `EVENTSOURCE_REDIS_SOCKET_TIMEOUT` in seconds, ...). Unset variables keep the defaults;
    /// `REDIS_URL` is used when no `EVENTSOURCE_REDIS_URL` is set. A variable under the prefix
    /// that names no option (a typo) is logged as a warning, with the known names.
    ///
    /// # Errors
    /// [`ConfigError`] naming the option whose variable does not parse, or any validation
    /// error.
    pub fn from_env() -> Result<Self, ConfigError> {
        let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
        for name in unknown_env_vars(names) {
            tracing::warn!(
                variable = %name,
                known = %Self::TEXT_KEYS.join(", ").to_ascii_uppercase(),
                "ignoring an environment variable that names no bus option (a typo?); `known` lists the names that may follow EVENTSOURCE_REDIS_"
            );
        }
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// As [`from_env`](Self::from_env), reading variables through `lookup` (for tests and
    /// other sources); unknown names cannot be listed this way, so none are warned about.
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        if let Some(url) = lookup("REDIS_URL") {
            c.redis_url = url;
        }
        let mut seen = OptionsSeen::default();
        for key in Self::TEXT_KEYS {
            let variable = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase());
            if let Some(raw) = lookup(&variable) {
                seen.once(key, &variable)?;
                c.set_text(key, &raw).map_err(|e| ConfigError {
                    reason: format!("environment variable {variable}: {}", e.reason),
                    ..e
                })?;
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// Which options a text source set, and under which name: an option given twice (under its
/// name and an alias, `batch_size` and `stream_read_count`) is refused rather than one
/// silently winning.
#[derive(Default)]
struct OptionsSeen(Vec<(&'static str, String)>);

impl OptionsSeen {
    fn once(&mut self, key: &str, shown_as: &str) -> Result<(), ConfigError> {
        let Some(option) = RedisEventBusConfig::option_of(key) else {
            return Ok(());
        };
        if let Some((_, first)) = self.0.iter().find(|(o, _)| *o == option) {
            return Err(ConfigError::new(
                option,
                format!("given twice, as {first} and as {shown_as}: keep one"),
            ));
        }
        self.0.push((option, shown_as.to_owned()));
        Ok(())
    }
}

/// The names among `names` under [`ENV_PREFIX`] that name no option.
fn unknown_env_vars(names: impl Iterator<Item = String>) -> Vec<String> {
    names
        .filter(|name| {
            name.strip_prefix(ENV_PREFIX).is_some_and(|rest| {
                !OTHER_ENV_VARS.contains(&rest)
                    && !RedisEventBusConfig::TEXT_KEYS
                        .iter()
                        .any(|key| key.to_ascii_uppercase() == rest)
            })
        })
        .collect()
}

/// Reads the text form: a map from text keys (the Python names: `block_ms`, `socket_timeout`
/// in seconds, `stream_read_count` or `batch_size`, ...) to strings, numbers or booleans;
/// missing keys keep the defaults, `null` keeps the default, an unknown key is refused. The
/// result is not validated here: the bus validates when it is built.
impl<'de> Deserialize<'de> for RedisEventBusConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Bool(bool),
            Unsigned(u64),
            Signed(i64),
            Float(f64),
            String(String),
        }
        let map = std::collections::BTreeMap::<String, Option<Text>>::deserialize(deserializer)?;
        let mut config = Self::default();
        let mut seen = OptionsSeen::default();
        for (key, value) in map {
            seen.once(&key, &key).map_err(serde::de::Error::custom)?;
            let raw = match value {
                None => continue,
                Some(Text::Bool(b)) => b.to_string(),
                Some(Text::Unsigned(n)) => n.to_string(),
                Some(Text::Signed(n)) => n.to_string(),
                Some(Text::Float(f)) => f.to_string(),
                Some(Text::String(s)) => s,
            };
            match config.set_text(&key, &raw) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown option `{key}`, expected one of {}",
                        Self::TEXT_KEYS.join(", ")
                    )));
                }
                Err(e) => return Err(serde::de::Error::custom(e)),
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_variables_under_the_prefix_are_found() {
        let names = [
            "EVENTSOURCE_REDIS_URL",
            "EVENTSOURCE_REDIS_BATCH_SISE",
            "EVENTSOURCE_REDIS_BLOCK_MS",
            "EVENTSOURCE_REDIS_BLOCK",
            "EVENTSOURCE_REDIS_READER_KIND",
            "EVENTSOURCE_REDIS_block_ms",
            "REDIS_URL",
            "PATH",
        ]
        .map(String::from);
        // Lower case is not read, so it is reported too.
        assert_eq!(
            unknown_env_vars(names.into_iter()),
            [
                "EVENTSOURCE_REDIS_BATCH_SISE",
                "EVENTSOURCE_REDIS_BLOCK",
                "EVENTSOURCE_REDIS_READER_KIND",
                "EVENTSOURCE_REDIS_block_ms"
            ]
        );
    }
}
