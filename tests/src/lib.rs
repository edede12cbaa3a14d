pub mod client;
pub mod daemon;
pub mod model;
pub mod netns;
pub mod ops;
pub mod packets;
pub mod policy_model;
pub mod xtask;
