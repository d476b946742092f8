//! The table: one row per figure, coord beside its peer, with the target.

/// How a row's numbers read.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Milliseconds.
    Ms,
    /// Microseconds.
    Us,
    /// Mebibytes.
    MiB,
    /// A plain number.
    Count,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Ms if v >= 100.0 => format!("{v:.0} ms"),
            Unit::Ms => format!("{v:.2} ms"),
            Unit::Us if v >= 1000.0 => format!("{:.2} ms", v / 1e3),
            Unit::Us => format!("{v:.1} µs"),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::Count if v.fract() == 0.0 => format!("{v:.0}"),
            Unit::Count => format!("{v:.2}"),
        }
    }
}

/// The median and p99 of some samples (nearest rank: with fewer than 100
/// samples the p99 is the largest).
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub p99: f64,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        Stat {
            median: percentile(samples, 0.5),
            p99: percentile(samples, 0.99),
        }
    }

    /// One measurement: median and p99 are the same.
    pub fn one(v: f64) -> Stat {
        Stat { median: v, p99: v }
    }
}

/// The `p`-quantile of `samples` (nearest rank); NaN if there are none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((s.len() as f64) * p).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

#[derive(Debug)]
pub struct Row {
    pub scenario: String,
    pub figure: String,
    pub unit: Unit,
    pub coord: Option<Stat>,
    pub peer: Option<Stat>,
    /// What the ratio column shows; by default peer median / coord median.
    pub ratio: Option<String>,
    pub target: String,
    pub met: Option<bool>,
}

impl Row {
    pub fn new(scenario: &str, figure: impl Into<String>, unit: Unit) -> Row {
        Row {
            scenario: scenario.to_owned(),
            figure: figure.into(),
            unit,
            coord: None,
            peer: None,
            ratio: None,
            target: "—".to_owned(),
            met: None,
        }
    }

    pub fn coord(mut self, s: Stat) -> Row {
        self.coord = Some(s);
        self
    }

    pub fn peer(mut self, s: Stat) -> Row {
        self.peer = Some(s);
        self
    }

    pub fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = target.into();
        self.met = Some(met);
        self
    }

    fn ratio_text(&self) -> String {
        if let Some(r) = &self.ratio {
            return r.clone();
        }
        match (self.coord, self.peer) {
            (Some(c), Some(p)) if c.median > 0.0 => format!("{:.2}x", p.median / c.median),
            _ => "—".to_owned(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    pub fn add(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn failed(&mut self, scenario: &str, why: &str) {
        let mut row = Row::new(scenario, "FAILED (see above)", Unit::Count);
        row.target = why.lines().next().unwrap_or("").chars().take(60).collect();
        row.met = Some(false);
        self.rows.push(row);
    }

    /// The table, in Markdown (readable as it is, pasteable into
    /// BENCHMARKS.md).
    pub fn print(&self) {
        let head = [
            "scenario",
            "figure",
            "coord median",
            "coord p99",
            "peer median",
            "peer p99",
            "peer/coord",
            "target",
            "met?",
        ];
        let dash = || "—".to_owned();
        let cells: Vec<[String; 9]> = self
            .rows
            .iter()
            .map(|r| {
                let show = |s: Option<Stat>, p99: bool| {
                    s.map_or_else(dash, |s| r.unit.show(if p99 { s.p99 } else { s.median }))
                };
                [
                    r.scenario.clone(),
                    r.figure.clone(),
                    show(r.coord, false),
                    show(r.coord, true),
                    show(r.peer, false),
                    show(r.peer, true),
                    r.ratio_text(),
                    r.target.clone(),
                    match r.met {
                        Some(true) => "yes".to_owned(),
                        Some(false) => "no".to_owned(),
                        None => dash(),
                    },
                ]
            })
            .collect();
        let mut widths = head.map(|h| h.chars().count());
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: &[String]| {
            let mut out = String::from("|");
            for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
                let pad = w - c.chars().count();
                // Numbers right-aligned, words left-aligned.
                if (2..=6).contains(&i) {
                    out.push_str(&format!(" {}{c} |", " ".repeat(pad)));
                } else {
                    out.push_str(&format!(" {c}{} |", " ".repeat(pad)));
                }
            }
            out
        };
        println!("{}", line(&head.map(str::to_owned)));
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if (2..=6).contains(&i) {
                    format!("{}:", "-".repeat(w + 1))
                } else {
                    "-".repeat(w + 2)
                }
            })
            .collect();
        println!("|{}|", rule.join("|"));
        for row in &cells {
            println!("{}", line(row));
        }
    }
}
