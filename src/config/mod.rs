//! Typed configuration: a TOML file layered under `MEMBERSYNC__SECTION__KEY` environment
//! overrides, validated once at start.
//!
//! Secrets never live in the file: a secret key may only come from the environment or from a
//! `<key>_file` path, and is held in a [`SecretString`] so that it cannot reach `Debug`
//! output, logs or errors by accident.

mod api;
mod bridge;
mod error;
mod librdkafka;
mod load;
mod sections;
mod sync;
mod transport;

pub use api::*;
pub use bridge::{BridgeConfig, RouteConfig};
pub use error::ConfigError;
pub use librdkafka::LibrdkafkaProperties;
pub use load::{ENV_PREFIX, load, load_from};
pub use sections::*;
pub use sync::*;
pub use transport::{default_sslmode, is_loopback_host, same_origin_redirects};
