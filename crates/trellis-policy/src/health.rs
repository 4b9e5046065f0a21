//! Health of one target under active checks, as AWS target groups count it:
//! `unhealthy_threshold` failed checks in a row make a healthy target
//! unhealthy, `healthy_threshold` passed checks in a row make an unhealthy
//! one healthy again. A new target counts as healthy until its checks say
//! otherwise, so a service serves as soon as it exists; a target that does
//! not answer stops getting new connections within
//! `interval × unhealthy_threshold` (plus one check's timeout).

use serde::{Deserialize, Serialize};

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Passed,
    Failed,
}

/// A target's health as traffic sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// No check has finished yet; the target gets traffic.
    Initial,
    Healthy,
    Unhealthy,
}

impl Health {
    /// Whether new connections may go to the target.
    pub fn serves(self) -> bool {
        !matches!(self, Health::Unhealthy)
    }
}

/// The state of one target's checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetHealth {
    health: Health,
    /// Checks in a row that disagree with `health` (passes while unhealthy, failures otherwise).
    streak: u32,
}

impl Default for TargetHealth {
    fn default() -> Self {
        Self { health: Health::Initial, streak: 0 }
    }
}

impl TargetHealth {
    pub fn health(&self) -> Health {
        self.health
    }

    /// Counts one check; returns the new health when it changed.
    pub fn observe(&mut self, check: Check, healthy_threshold: u32, unhealthy_threshold: u32) -> Option<Health> {
        let (healthy_threshold, unhealthy_threshold) = (healthy_threshold.max(1), unhealthy_threshold.max(1));
        let next = match (self.health, check) {
            (Health::Unhealthy, Check::Passed) => {
                self.streak += 1;
                (self.streak >= healthy_threshold).then_some(Health::Healthy)
            }
            (Health::Unhealthy, Check::Failed) => {
                self.streak = 0;
                None
            }
            (_, Check::Failed) => {
                self.streak += 1;
                (self.streak >= unhealthy_threshold).then_some(Health::Unhealthy)
            }
            (Health::Initial, Check::Passed) => Some(Health::Healthy),
            (Health::Healthy, Check::Passed) => {
                self.streak = 0;
                None
            }
        };
        if let Some(health) = next {
            self.health = health;
            self.streak = 0;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Check::*;

    #[test]
    fn thresholds_count_checks_in_a_row() {
        let mut t = TargetHealth::default();
        assert!(t.health().serves(), "a new target serves");
        assert_eq!(t.observe(Passed, 3, 2), Some(Health::Healthy));
        assert_eq!(t.observe(Failed, 3, 2), None, "one failure is not enough");
        assert_eq!(t.observe(Passed, 3, 2), None, "a pass resets the failures");
        assert_eq!(t.observe(Failed, 3, 2), None);
        assert_eq!(t.observe(Failed, 3, 2), Some(Health::Unhealthy));
        assert!(!t.health().serves());
        assert_eq!(t.observe(Passed, 3, 2), None);
        assert_eq!(t.observe(Failed, 3, 2), None, "a failure resets the passes");
        assert_eq!(t.observe(Passed, 3, 2), None);
        assert_eq!(t.observe(Passed, 3, 2), None);
        assert_eq!(t.observe(Passed, 3, 2), Some(Health::Healthy));
    }

    #[test]
    fn a_target_that_never_answers_is_unhealthy_after_the_threshold() {
        let mut t = TargetHealth::default();
        assert_eq!(t.observe(Failed, 5, 2), None);
        assert_eq!(t.observe(Failed, 5, 2), Some(Health::Unhealthy));
    }
}
