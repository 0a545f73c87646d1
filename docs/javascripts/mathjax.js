// MathJax configuration for pymdownx.arithmatex (generic mode), as the
// mkdocs-material documentation recommends. MathJax itself is loaded after this,
// from the copy shipped with the docs (javascripts/mathjax/, MathJax 3.2.2,
// es5/tex-chtml.js and its woff-v2 fonts, Apache-2.0), so math renders offline.

// The vendored copy's folder, from this script's own URL: pages sit at different
// depths, so a path relative to the page would miss it on some of them.
const mathjaxBase = new URL("mathjax/", document.currentScript.src).href;

window.MathJax = {
  loader: {
    // Anything MathJax loads on demand comes from the vendored copy, never a CDN.
    paths: { mathjax: mathjaxBase.replace(/\/$/, "") },
  },
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  chtml: {
    fontURL: mathjaxBase + "output/chtml/fonts/woff-v2",
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Re-typeset when material swaps a new page in (instant navigation), after any
// typeset still running. The first emission is the page that MathJax's startup
// typesets itself: clearing the output cache on a page already typeset drops the
// characters' CSS and nothing re-adds it, so the math would come out blank.
if (typeof document$ !== "undefined") {
  let first = true;
  document$.subscribe(() => {
    if (first) {
      first = false;
      return;
    }
    if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return;
    MathJax.startup.promise = MathJax.startup.promise.then(() => {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      return MathJax.typesetPromise();
    });
  });
}
