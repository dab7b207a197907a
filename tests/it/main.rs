//! The one integration test binary: every test starts the real daemon in-process on port 0
//! with a temp data dir and speaks real HTTP to it.

mod support;

mod address;
mod bad_input;
mod binary;
mod callback_flow;
mod callbacks;
mod delivery;
mod dns;
mod http_limits;
mod lease;
mod ratelimit;
mod smtp;
mod verify_flow;
mod watch;
