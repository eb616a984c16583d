//! HTTP servers. `ops` serves metrics and health on its own port.

pub mod ops;
