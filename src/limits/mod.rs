//! The limits a connection is held to besides the server's connection count: how many one
//! client may have open ([`per_client`]), and how long one may stay quiet ([`idle`]).

pub(crate) mod idle;
pub(crate) mod per_client;
