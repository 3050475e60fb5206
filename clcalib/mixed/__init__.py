"""Mixed precision: what each layer's bits cost (sensitivity), which bits to give each layer under
a size budget (allocation), and the smallest model within an accuracy target (search)."""
