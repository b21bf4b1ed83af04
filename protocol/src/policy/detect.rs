//! Overload and underload detection over a host's own load history.
//!
//! [`threshold`] is a pure function of the configuration and the history: the upper threshold
//! in force now (static or adaptive) and whether the newest sample is above it.
//! [`LoadTracker`] adds the hysteresis: the overloaded state is entered after `k` consecutive
//! samples above the threshold and left after `k` consecutive samples not above it; the
//! underloaded state holds after `k` consecutive samples below the lower threshold.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{to_permille, Detector, PolicyConfig, MAX_HISTORY};
use crate::report::PERMILLE;

/// The newest load samples of one host (permille of capacity), at most `capacity` of them;
/// pushing into a full history drops the oldest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    samples: VecDeque<u32>,
    capacity: usize,
}

impl History {
    /// An empty history holding at most `capacity` samples (clamped to `1..=MAX_HISTORY`).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_HISTORY);
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends a sample, dropping the oldest when full.
    pub fn push(&mut self, permille: u32) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(permille);
    }

    /// How many samples are held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The most samples held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<u32> {
        self.samples.back().copied()
    }

    /// The samples, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.samples.iter().copied()
    }

    /// The samples as fractions of capacity, oldest first.
    fn fractions(&self) -> Vec<f64> {
        self.iter()
            .map(|p| f64::from(p) / f64::from(PERMILLE))
            .collect()
    }
}

/// Which detector produced a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// The static upper threshold.
    Static,
    /// Median absolute deviation.
    Mad,
    /// Interquartile range.
    Iqr,
    /// Local regression.
    LocalRegression,
}

impl std::fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DetectorKind::Static => "static",
            DetectorKind::Mad => "mad",
            DetectorKind::Iqr => "iqr",
            DetectorKind::LocalRegression => "lr",
        })
    }
}

/// The upper threshold in force for one history, and the newest sample against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Threshold {
    /// The detector that set the threshold (`Static` also when an adaptive one fell back).
    pub detector: DetectorKind,
    /// The upper threshold, permille. For local regression: the prediction at which the
    /// host counts as overloaded (1000 / s).
    pub upper_permille: u32,
    /// Whether the newest sample (for local regression: the predicted next sample) is above
    /// the threshold.
    pub above: bool,
    /// Local regression only: the predicted next sample, permille.
    pub predicted_permille: Option<u32>,
    /// An adaptive detector had too little history (or a degenerate one) and used the static
    /// threshold.
    pub fallback: bool,
}

/// The threshold in force for `history` under `cfg`, and whether the newest sample is above it.
/// An empty history is never above.
pub fn threshold(cfg: &PolicyConfig, history: &History) -> Threshold {
    let latest = history.latest().unwrap_or(0);
    let fixed = |fallback| Threshold {
        detector: DetectorKind::Static,
        upper_permille: cfg.upper_permille,
        above: !history.is_empty() && latest > cfg.upper_permille,
        predicted_permille: None,
        fallback,
    };
    let adaptive =
        |upper: f64| to_permille(upper).clamp(cfg.adaptive_floor_permille.min(PERMILLE), PERMILLE);
    let enough = history.len() >= cfg.min_history.max(1);
    match cfg.detector {
        Detector::Static => fixed(false),
        _ if !enough => fixed(true),
        Detector::Mad { safety } => {
            let upper = adaptive(1.0 - safety * mad(&history.fractions()));
            Threshold {
                detector: DetectorKind::Mad,
                upper_permille: upper,
                above: latest > upper,
                predicted_permille: None,
                fallback: false,
            }
        }
        Detector::Iqr { safety } => {
            let upper = adaptive(1.0 - safety * iqr(&history.fractions()));
            Threshold {
                detector: DetectorKind::Iqr,
                upper_permille: upper,
                above: latest > upper,
                predicted_permille: None,
                fallback: false,
            }
        }
        Detector::LocalRegression {
            safety,
            window,
            robust,
        } => {
            let all = history.fractions();
            let tail = &all[all.len().saturating_sub(window.max(3))..];
            match predict_next(tail, robust) {
                Some(predicted) => Threshold {
                    detector: DetectorKind::LocalRegression,
                    upper_permille: adaptive(1.0 / safety),
                    above: safety * predicted >= 1.0,
                    predicted_permille: Some(to_permille(predicted)),
                    fallback: false,
                },
                None => fixed(true),
            }
        }
    }
}

/// Whether a host is overloaded, underloaded or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadState {
    /// Below the lower threshold for `k` samples: a drain candidate.
    Underloaded,
    /// Neither.
    Normal,
    /// Above the upper threshold for `k` samples, and not yet `k` samples below it.
    Overloaded,
}

impl std::fmt::Display for LoadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoadState::Underloaded => "underloaded",
            LoadState::Normal => "normal",
            LoadState::Overloaded => "overloaded",
        })
    }
}

/// A host's load state after one sample, with the figures behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assessment {
    /// The state.
    pub state: LoadState,
    /// The newest sample, permille.
    pub sample_permille: u32,
    /// The upper threshold in force and the newest sample against it.
    pub threshold: Threshold,
    /// The lower threshold, permille.
    pub lower_permille: u32,
    /// Consecutive samples above the upper threshold, up to and including this one.
    pub above_run: u32,
    /// Consecutive samples not above the upper threshold.
    pub clear_run: u32,
    /// Consecutive samples below the lower threshold.
    pub below_lower_run: u32,
    /// `k`, the hysteresis length.
    pub hysteresis: u32,
}

impl Assessment {
    /// Whether the host should shed load now: overloaded, and the newest sample still above
    /// the threshold (a host that is still in the overloaded state while its samples already
    /// clear has nothing left to shed).
    pub fn wants_to_shed(&self) -> bool {
        self.state == LoadState::Overloaded && self.threshold.above
    }
}

/// A host's load history and hysteresis state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadTracker {
    history: History,
    above_run: u32,
    clear_run: u32,
    below_lower_run: u32,
    overloaded: bool,
}

impl LoadTracker {
    /// A tracker with an empty history of `cfg.history_len` samples, in the normal state.
    pub fn new(cfg: &PolicyConfig) -> Self {
        Self {
            history: History::new(cfg.history_len),
            above_run: 0,
            clear_run: 0,
            below_lower_run: 0,
            overloaded: false,
        }
    }

    /// The history held.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Whether the tracker is in the overloaded state.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded
    }

    /// Takes one sample (permille of capacity) and returns the resulting assessment.
    pub fn observe(&mut self, sample_permille: u32, cfg: &PolicyConfig) -> Assessment {
        self.history.push(sample_permille);
        let t = threshold(cfg, &self.history);
        let k = cfg.hysteresis.max(1);
        if t.above {
            self.above_run = self.above_run.saturating_add(1);
            self.clear_run = 0;
        } else {
            self.clear_run = self.clear_run.saturating_add(1);
            self.above_run = 0;
        }
        if !self.overloaded && self.above_run >= k {
            self.overloaded = true;
        } else if self.overloaded && self.clear_run >= k {
            self.overloaded = false;
        }
        if sample_permille < cfg.lower_permille {
            self.below_lower_run = self.below_lower_run.saturating_add(1);
        } else {
            self.below_lower_run = 0;
        }
        let state = if self.overloaded {
            LoadState::Overloaded
        } else if self.below_lower_run >= k {
            LoadState::Underloaded
        } else {
            LoadState::Normal
        };
        Assessment {
            state,
            sample_permille,
            threshold: t,
            lower_permille: cfg.lower_permille,
            above_run: self.above_run,
            clear_run: self.clear_run,
            below_lower_run: self.below_lower_run,
            hysteresis: k,
        }
    }
}

/// The median of `v` (mean of the two middle values for an even count); 0 for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The median absolute deviation from the median.
pub fn mad(v: &[f64]) -> f64 {
    let m = median(v);
    let dev: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
    median(&dev)
}

/// The `q` quantile (0..=1) by linear interpolation between order statistics; 0 when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// The interquartile range, Q3 − Q1.
pub fn iqr(v: &[f64]) -> f64 {
    quantile(v, 0.75) - quantile(v, 0.25)
}

/// Tricube weight: (1 − |u|³)³ inside (−1, 1), 0 outside.
fn tricube(u: f64) -> f64 {
    let a = u.abs();
    if a >= 1.0 {
        0.0
    } else {
        let t = 1.0 - a * a * a;
        t * t * t
    }
}

/// Bisquare weight: (1 − u²)² inside (−1, 1), 0 outside.
fn bisquare(u: f64) -> f64 {
    let a = u.abs();
    if a >= 1.0 {
        0.0
    } else {
        let t = 1.0 - a * a;
        t * t
    }
}

/// Weighted least-squares line through `(i, y[i])`; `None` when degenerate.
fn fit_line(y: &[f64], w: &[f64]) -> Option<(f64, f64)> {
    let (mut sw, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (i, (&yi, &wi)) in y.iter().zip(w).enumerate() {
        let x = i as f64;
        sw += wi;
        sx += wi * x;
        sy += wi * yi;
        sxx += wi * x * x;
        sxy += wi * x * yi;
    }
    let det = sw * sxx - sx * sx;
    if sw <= 0.0 || det.abs() < 1e-12 || !det.is_finite() {
        return None;
    }
    let slope = (sw * sxy - sx * sy) / det;
    let intercept = (sy - slope * sx) / sw;
    (slope.is_finite() && intercept.is_finite()).then_some((intercept, slope))
}

/// Predicts the sample after `y` (oldest first) by local regression: tricube weights by
/// distance from the newest sample (the oldest weighs 0), optionally two bisquare reweighting
/// passes on the residuals. `None` with fewer than 3 samples or a degenerate fit.
pub fn predict_next(y: &[f64], robust: bool) -> Option<f64> {
    let n = y.len();
    if n < 3 {
        return None;
    }
    let span = (n - 1) as f64;
    let base: Vec<f64> = (0..n).map(|i| tricube((span - i as f64) / span)).collect();
    let mut w = base.clone();
    let (mut a, mut b) = fit_line(y, &w)?;
    if robust {
        for _ in 0..2 {
            let residuals: Vec<f64> = y
                .iter()
                .enumerate()
                .map(|(i, yi)| yi - (a + b * i as f64))
                .collect();
            let s = median(&residuals.iter().map(|r| r.abs()).collect::<Vec<_>>());
            if s <= 1e-12 {
                break;
            }
            for (wi, (bi, r)) in w.iter_mut().zip(base.iter().zip(&residuals)) {
                *wi = bi * bisquare(r / (6.0 * s));
            }
            match fit_line(y, &w) {
                Some(fit) => (a, b) = fit,
                None => break,
            }
        }
    }
    let next = a + b * n as f64;
    next.is_finite().then_some(next)
}
