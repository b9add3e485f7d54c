//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr`, then `min_lr`.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step > self.total_steps || self.total_steps <= self.warmup_steps {
            return self.min_lr;
        }
        let ratio =
            (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_and_floor() {
        let s = LrSchedule {
            max_lr: 6e-4,
            min_lr: 6e-5,
            warmup_steps: 10,
            total_steps: 50,
        };
        assert!((s.lr(0) - 6e-5).abs() < 1e-15);
        assert!((s.lr(9) - 6e-4).abs() < 1e-15);
        assert!((s.lr(10) - 6e-4).abs() < 1e-15);
        assert!((s.lr(30) - (6e-5 + 0.5 * 5.4e-4)).abs() < 1e-12);
        assert!((s.lr(50) - 6e-5).abs() < 1e-15);
        assert!((s.lr(51) - 6e-5).abs() < 1e-15);
    }
}
