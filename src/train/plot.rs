//! `sft plot`: a run's `log.csv` drawn as one SVG — losses, learning rate and throughput
//! against the step. `sft train` draws `loss.svg` beside the log when it finishes.

use super::log::{read_log, LogRow};
use anyhow::{anyhow, ensure, Context, Result};
use clap::Args;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// A run directory (holding log.csv) or a log file.
    pub log: PathBuf,
    /// The SVG to write; default: loss.svg beside the log.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw the losses on a logarithmic axis.
    #[arg(long)]
    pub log_scale: bool,
}

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(214, 39, 40);
const OTHER: RGBColor = RGBColor(60, 60, 60);

/// What `sft plot` drew.
#[derive(Clone, Debug, PartialEq)]
pub struct PlotSummary {
    pub svg: PathBuf,
    pub rows: usize,
    pub last_train_loss: Option<(u64, f64)>,
    pub best_val_loss: Option<(u64, f64)>,
}

/// `log.csv` inside a run directory, or the path itself.
fn log_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("log.csv")
    } else {
        path.to_path_buf()
    }
}

/// Draws the log at `log` (a file or a run directory) into `out` (default: loss.svg beside it).
pub fn plot_log(log: &Path, out: Option<&Path>, log_scale: bool) -> Result<PlotSummary> {
    let log = log_path(log);
    let rows = read_log(&log)?;
    ensure!(!rows.is_empty(), "{}: no steps logged yet", log.display());
    let svg = out.map(Path::to_path_buf).unwrap_or_else(|| log.with_file_name("loss.svg"));
    ensure!(!svg.is_dir(), "--out {}: a directory; give the SVG file to write", svg.display());
    ensure!(
        !crate::paths::same_file(&svg, &log),
        "--out {} is the log being plotted: give another file",
        svg.display()
    );
    // The run's folder and its parent ("demo/run"): "run" alone says little.
    let dir = log.parent().map(|p| p.components().rev().take(2).collect::<Vec<_>>()).unwrap_or_default();
    let title: Vec<String> = dir.iter().rev().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let title = if title.is_empty() { "sft".to_string() } else { title.join("/") };
    let text = render_svg(&rows, &title, log_scale).with_context(|| format!("plotting {}", log.display()))?;
    // Temp file + rename: a reader (a browser refreshing the plot) never sees half a file.
    // The temporary name appends to the whole name, so that `loss` and `loss.svg` never share it.
    let mut tmp = svg.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, &svg) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), svg.display()));
    }
    let points = |f: fn(&LogRow) -> Option<f64>| rows.iter().filter_map(move |r| f(r).map(|v| (r.step, v)));
    Ok(PlotSummary {
        svg,
        rows: rows.len(),
        last_train_loss: points(|r| r.train_loss).next_back(),
        best_val_loss: points(|r| r.val_loss).min_by(|a, b| a.1.total_cmp(&b.1)),
    })
}

/// `sft plot`.
pub fn plot(args: PlotArgs) -> Result<()> {
    let s = plot_log(&args.log, args.out.as_deref(), args.log_scale)?;
    println!("wrote {} ({} steps)", s.svg.display(), s.rows);
    if let Some((step, loss)) = s.last_train_loss {
        println!("last train loss {loss:.4} at step {step}");
    }
    if let Some((step, loss)) = s.best_val_loss {
        println!("best val loss   {loss:.4} at step {step}");
    }
    Ok(())
}

/// A range that holds `values` with a margin (a flat series gets a unit-wide band).
/// Values beyond ±1e300 (or, on a log scale, outside 1e-150..1e150) are left out like non-finite
/// ones: the margin around them, or the ratio of the ends on a log scale, overflows to infinity,
/// on which the axis' tick search never ends.
fn span(values: impl Iterator<Item = f64>, log_scale: bool) -> Option<Range<f64>> {
    let (lo, hi) = values
        .filter(|v| if log_scale { (1e-150..=1e150).contains(v) } else { v.abs() <= 1e300 })
        .fold(None, |acc: Option<(f64, f64)>, v| Some(acc.map_or((v, v), |(a, b)| (a.min(v), b.max(v)))))?;
    if log_scale {
        return Some(lo / 1.2..hi * 1.2);
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 * hi.abs().max(1.0) };
    Some(lo - pad..hi + pad)
}

/// `points` with their values held to `range`: a value the axis leaves out (see [`span`]) is
/// drawn at its edge, where plotters' pixel arithmetic cannot overflow.
fn within(points: Vec<(f64, f64)>, range: &Range<f64>) -> Vec<(f64, f64)> {
    points.into_iter().map(|(x, y)| (x, y.clamp(range.start, range.end))).collect()
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// The SVG text: losses on top (train as a line, validation as points joined by a line), the
/// learning rate and tokens/s below.
pub fn render_svg(rows: &[LogRow], title: &str, log_scale: bool) -> Result<String> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (900, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(plot_err)?;
        let (top, bottom) = root.split_vertically(500);
        let (lr_area, speed_area) = bottom.split_vertically(200);
        let last = rows.iter().map(|r| r.step).max().unwrap_or(1).max(1);
        let first = rows.iter().map(|r| r.step).min().unwrap_or(0).min(last - 1);
        let steps = first as f64..last as f64;

        let train: Vec<(f64, f64)> =
            rows.iter().filter_map(|r| r.train_loss.map(|l| (r.step as f64, l))).collect();
        let val: Vec<(f64, f64)> =
            rows.iter().filter_map(|r| r.val_loss.map(|l| (r.step as f64, l))).collect();
        let losses = span(train.iter().chain(&val).map(|p| p.1), log_scale).unwrap_or(0.0..1.0);
        let (train, val) = (within(train, &losses), within(val, &losses));
        let series = [("train loss", &train, TRAIN), ("val loss", &val, VAL)];
        if log_scale {
            let mut chart =
                new_chart(&top, steps.clone(), (losses.start..losses.end).log_scale(), "loss (log)")?;
            draw_losses(&mut chart, &series)?;
        } else {
            let mut chart = new_chart(&top, steps.clone(), losses, "loss")?;
            draw_losses(&mut chart, &series)?;
        }

        let lr: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.lr)).collect();
        let range = span(lr.iter().map(|p| p.1), false).unwrap_or(0.0..1.0);
        let lr = within(lr, &range);
        let mut chart = new_chart(&lr_area, steps.clone(), range, "lr")?;
        chart.draw_series(LineSeries::new(lr, OTHER.stroke_width(2))).map_err(plot_err)?;

        let speed: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.tokens_per_s)).collect();
        let range = span(speed.iter().map(|p| p.1), false).unwrap_or(0.0..1.0);
        let speed = within(speed, &range);
        let mut chart = new_chart(&speed_area, steps, range, "tokens/s")?;
        chart.draw_series(LineSeries::new(speed, OTHER.stroke_width(2))).map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(text)
}

/// A named line: its label, (step, value) points and colour.
type Series<'s> = (&'static str, &'s Vec<(f64, f64)>, RGBColor);

type Chart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

fn new_chart<'a, 'b, Y>(
    area: &'a DrawingArea<SVGBackend<'b>, Shift>,
    steps: Range<f64>,
    y: Y,
    label: &str,
) -> Result<Chart<'a, 'b, Y::CoordDescType>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, y)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(label)
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

fn draw_losses<'a, DB: DrawingBackend + 'a, Y: Ranged<ValueType = f64> + ValueFormatter<f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    series: &[Series],
) -> Result<()> {
    for &(name, points, color) in series {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if name == "val loss" {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(plot_err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, rows: &[&str]) -> PathBuf {
        let path = dir.join("log.csv");
        let text = std::iter::once(crate::train::log::HEADER).chain(rows.iter().copied()).collect::<Vec<_>>();
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
        path
    }

    /// Finite but extreme values (a diverged run's loss of 1e308) made the axis margin infinite
    /// and the tick search spin forever; they are left off the axes like NaN.
    #[test]
    fn extreme_values_are_drawn_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        for (row, log_scale) in [
            ("1,20,1.7e308,1,,,3e-3,1,0.1,100", false),
            ("1,20,1,1,,,1.7e308,1,0.1,1.7e308", false),
            ("1,20,5e-324,1,,,3e-3,1,0.1,100", true),
            // Left off the axis, but still drawn: at the axis' edge, not at an overflowed pixel.
            ("1,20,-1e308,1,,,-1e308,1,0.1,-1e308", false),
            ("1,20,1e200,1,1e-200,1,3e-3,1,0.1,100", true),
        ] {
            let log = write_log(dir.path(), &[row, "2,40,1,1,,,3e-3,1,0.2,100"]);
            let summary = plot_log(&log, None, log_scale).unwrap();
            assert_eq!(summary.rows, 2);
        }
    }

    /// `--out` the log itself replaced the training log with the SVG; a directory left its
    /// temporary file behind.
    #[test]
    fn the_output_is_never_the_log_nor_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let log = write_log(dir.path(), &["1,20,2,7.4,,,3e-3,1,0.1,100"]);
        let err = plot_log(&log, Some(&log), false).unwrap_err().to_string();
        assert!(err.contains("is the log being plotted"), "{err}");
        assert!(std::fs::read_to_string(&log).unwrap().starts_with("step,"));
        let sub = dir.path().join("out");
        std::fs::create_dir(&sub).unwrap();
        let err = plot_log(&log, Some(&sub), false).unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
