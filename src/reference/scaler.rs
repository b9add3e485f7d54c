//! Dynamic loss scaling as PyTorch's GradScaler applies it, on the CPU: the rule the step's
//! state update follows on the GPU ([`crate::ops::optimizer::advance_step_state`]), written
//! plainly for the tests.

use crate::graph::step::{INITIAL_LOSS_SCALE, LOSS_SCALE_GROWTH_INTERVAL};

/// Start at 2^16, halve (down to 2^-16) and skip the step on any non-finite gradient, double (up
/// to 2^24) after `growth_interval` clean steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    pub clean_steps: usize,
    pub enabled: bool,
    pub growth_interval: usize,
}

impl LossScaler {
    pub fn new(enabled: bool) -> LossScaler {
        LossScaler {
            scale: if enabled { INITIAL_LOSS_SCALE } else { 1.0 },
            clean_steps: 0,
            enabled,
            growth_interval: LOSS_SCALE_GROWTH_INTERVAL,
        }
    }

    /// Updates after a step; returns whether the step was skipped.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            if self.enabled {
                self.scale = (self.scale * 0.5).max(1.0 / 65536.0);
            }
            self.clean_steps = 0;
            return true;
        }
        self.clean_steps += 1;
        if self.enabled && self.clean_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(16_777_216.0);
            self.clean_steps = 0;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn loss_scale_follows_grad_scaler_rules() {
        let mut s = LossScaler::new(true);
        assert_eq!(s.scale, 65536.0);
        // An overflow halves the scale and skips the step.
        assert!(s.update(false));
        assert_eq!(s.scale, 32768.0);
        // 1999 clean steps keep it; the 2000th doubles it.
        for _ in 0..1999 {
            assert!(!s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(!s.update(true));
        assert_eq!(s.scale, 65536.0);
        // An overflow in the middle restarts the count.
        for _ in 0..1500 {
            s.update(true);
        }
        s.update(false);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        // Without f16 the scale stays 1 and non-finite steps are still skipped.
        let mut off = LossScaler::new(false);
        assert!(off.update(false));
        for _ in 0..4000 {
            off.update(true);
        }
        assert_eq!(off.scale, 1.0);
    }
}
