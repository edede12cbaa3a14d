
pub mod model;
pub mod packets;
pub mod netns;
pub mod client;
pub mod daemon;
pub mod ops;
pub mod xtask;
