//! Integration tests: the real `touchctl` binary against real files and state in temp folders.

mod backend;
mod support;

mod bad_fixtures;
mod channel_getui;
mod channel_oa;
mod channel_wecom;
mod ci_example;
mod cluster;
mod daemon;
mod daemon_support;
mod drift;
mod durations;
mod examples;
mod help;
mod open_platform_bind;
mod open_platform_crypt;
mod open_platform_daemon;
mod plan_apply;
mod readme;
mod review;
mod sandbox;
mod sandbox_open_platform;
mod schema;
mod secrets;
mod server;
mod state;
mod state_migrate;
mod terminal_escapes;
mod watch;
