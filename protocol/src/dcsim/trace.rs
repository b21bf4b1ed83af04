//! One VM's CPU trace: parsing it from text (one percentage per line) and reading its demand at
//! any time, interpolated between samples as CloudSim's `UtilizationModelPlanetLabInMemory`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A VM's CPU utilization, one sample per step, as fractions of its capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Where it came from (a file name), for reports and errors.
    pub name: String,
    /// Utilization samples, fractions in `0..=1`.
    pub samples: Vec<f64>,
}

/// Why a trace's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TraceError {
    /// No sample at all.
    #[error("trace {name}: no samples")]
    Empty {
        /// The trace's name.
        name: String,
    },
    /// A line that is not a number.
    #[error("trace {name}, line {line}: {text:?} is not a number")]
    NotANumber {
        /// The trace's name.
        name: String,
        /// 1-based line number.
        line: usize,
        /// The line's text.
        text: String,
    },
    /// A number outside 0..=100.
    #[error("trace {name}, line {line}: {text} is not a percentage in 0..=100")]
    OutOfRange {
        /// The trace's name.
        name: String,
        /// 1-based line number.
        line: usize,
        /// The line's text.
        text: String,
    },
}

impl Trace {
    /// Parses one CPU percentage (0..=100) per line. Surrounding whitespace and trailing empty
    /// lines are ignored; an empty line followed by more samples is an error.
    pub fn parse(name: &str, text: &str) -> Result<Self, TraceError> {
        let lines: Vec<&str> = text.lines().collect();
        let last = lines.iter().rposition(|l| !l.trim().is_empty());
        let Some(last) = last else {
            return Err(TraceError::Empty { name: name.into() });
        };
        let mut samples = Vec::with_capacity(last + 1);
        for (i, raw) in lines[..=last].iter().enumerate() {
            let text = raw.trim();
            let value: f64 = text.parse().map_err(|_| TraceError::NotANumber {
                name: name.into(),
                line: i + 1,
                text: text.into(),
            })?;
            if !(0.0..=100.0).contains(&value) {
                return Err(TraceError::OutOfRange {
                    name: name.into(),
                    line: i + 1,
                    text: text.into(),
                });
            }
            samples.push(value / 100.0);
        }
        Ok(Self {
            name: name.into(),
            samples,
        })
    }

    /// A trace from fractions, for tests and synthetic workloads (clamped to 0..=1).
    pub fn from_fractions(name: &str, samples: impl IntoIterator<Item = f64>) -> Self {
        Self {
            name: name.into(),
            samples: samples.into_iter().map(|s| s.clamp(0.0, 1.0)).collect(),
        }
    }

    /// Utilization at `time_s`, linear between samples `step_s` apart; past the end, the last
    /// sample holds.
    pub fn at(&self, time_s: f64, step_s: f64) -> f64 {
        let Some(&last) = self.samples.last() else {
            return 0.0;
        };
        let sample = |i: f64| -> f64 {
            // Non-negative and bounded by the clamp: truncation is safe.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let i = i.max(0.0) as usize;
            self.samples.get(i).copied().unwrap_or(last)
        };
        let x = time_s / step_s;
        let (i1, i2) = (x.floor(), x.ceil());
        let (u1, u2) = (sample(i1), sample(i2));
        if i1 == i2 {
            return u1;
        }
        u1 + (u2 - u1) / ((i2 - i1) * step_s) * (time_s - i1 * step_s)
    }
}
