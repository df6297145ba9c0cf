"""Multi-task strategies, composed of phases, a schedule, a gradient combiner and a finisher."""
